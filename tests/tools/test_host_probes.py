"""The host's part of a benchmark's JSON: which CPU, and how fast it runs Python (so that a
slower host is told from a slower change between two visits' rows)."""

from __future__ import annotations

import json

from gateway.tools import host_probes
from gateway.tools.benchmark import report


def test_the_python_loop_probe_times_its_work() -> None:
    small = host_probes.python_loop_ms(iterations=100_000, repeats=3)
    large = host_probes.python_loop_ms(iterations=1_000_000, repeats=3)
    assert 0 < small < large


def test_every_benchmark_document_says_which_host_and_how_fast(monkeypatch) -> None:
    monkeypatch.setattr(host_probes, "python_loop_ms", lambda: 123.4)
    document = json.loads(json.dumps(report([], {}, ["--stages", "t3step"])))
    assert document["host"]["python_loop_ms"] == 123.4
    assert "cores, Python 3." in document["host"]["cpu"]
    assert document["command"].endswith("--stages t3step")
