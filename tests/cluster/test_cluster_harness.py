"""The cluster tests' Ray start: a raylet that did not register in time is given one more try,
any other failure is not."""

from __future__ import annotations

import pytest

from cluster_harness import _start_ray


class _Ray:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.inits = 0
        self.shutdowns = 0

    def init(self, **_kwargs: object) -> None:
        self.inits += 1
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_raylet_start_timeout_is_tried_again_once() -> None:
    ray = _Ray([Exception("The current node timed out during startup. This could happen ...")])
    _start_ray(ray)
    assert (ray.inits, ray.shutdowns) == (2, 1)
    twice = _Ray([Exception("timed out during startup")] * 2)
    with pytest.raises(Exception, match="timed out during startup"):
        _start_ray(twice)
    assert twice.inits == 2


def test_other_start_failures_are_raised_at_once() -> None:
    ray = _Ray([RuntimeError("version mismatch")])
    with pytest.raises(RuntimeError, match="version mismatch"):
        _start_ray(ray)
    assert ray.inits == 1
