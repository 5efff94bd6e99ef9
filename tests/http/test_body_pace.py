"""The body clock: a total deadline and a minimum average rate after a grace, on the time the
server was reading (a table of cases)."""

from __future__ import annotations

import pytest

from gateway.http.body_pace import BodyPace


def pace(**kw: float) -> BodyPace:
    values = {"timeout_s": 60.0, "min_rate": 1000.0, "grace_s": 5.0, "started": 100.0, "paused_at_start": 0.0}
    values.update(kw)
    return BodyPace(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("received", "now", "paused_s", "paused", "failed", "next_look_s"),
    [
        (0, 100.0, 0.0, False, False, 5.01),  # just started: look again when the grace ends
        (0, 105.02, 0.0, False, True, 0.0),  # nothing after the grace: too slow
        (1, 105.02, 0.0, False, True, 0.0),  # one byte buys a millisecond
        (10_000, 110.0, 0.0, False, False, 5.01),  # 10 kB buys 10 s after the grace
        (10_000, 120.0, 0.0, False, True, 0.0),
        (10_000, 120.0, 10.0, False, False, 5.01),  # 10 s of it the server was not reading
        (10_000, 120.0, 10.0, True, False, 5.0),  # paused now: nothing to judge
        (10**9, 160.0, 0.0, False, True, 0.0),  # fast, but past the total deadline
        (10**9, 159.0, 0.0, False, False, 1.01),  # the deadline is the next look
    ],
)
def test_verdicts(received: int, now: float, paused_s: float, paused: bool, failed: bool, next_look_s: float) -> None:
    clock = pace()
    clock.received = received
    why, look = clock.verdict(now, paused_s, paused=paused)
    assert (why is not None) == failed, why
    assert look == pytest.approx(next_look_s, abs=1e-6)


def test_no_rate_leaves_only_the_deadline() -> None:
    clock = pace(min_rate=0.0)
    assert clock.verdict(150.0, 0.0, paused=False) == (None, pytest.approx(10.01))
    assert "within 60 s" in str(clock.verdict(160.0, 0.0, paused=False)[0])


def test_restart_gives_a_client_waiting_for_100_continue_a_fresh_clock() -> None:
    clock = pace()
    clock.received = 5
    clock.restart(200.0, 3.0)
    assert (clock.started, clock.paused_at_start, clock.received) == (200.0, 3.0, 0)
    assert clock.verdict(204.0, 3.0, paused=False)[0] is None
