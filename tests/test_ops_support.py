"""The test helpers that tell a stalled host from a slow server: they must see a stall when
there is one and none when there is none, or the tests that lean on them measure nothing."""

from __future__ import annotations

import sys
import time

from ops_support import StallWatch, cpu_s, quiet_attempts


def _frozen(seconds: float) -> None:
    """The watch thread cannot run while this thread keeps the interpreter lock: as if the
    host had stopped the process for ``seconds``."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        time.sleep(0.1)  # the watch is ticking
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        time.sleep(0.1)
    finally:
        sys.setswitchinterval(interval)


def test_the_watch_sees_a_process_that_could_not_run() -> None:
    with StallWatch() as watch:
        _frozen(0.6)
    assert watch.stalled and 0.4 < watch.longest_s < 5, watch.longest_s


def test_attempts_run_again_after_a_stall_and_stop_at_the_first_quiet_one() -> None:
    runs = 0
    for _ in quiet_attempts():
        runs += 1
        if runs == 1:
            _frozen(0.6)
    assert runs == 2
    stalled_every_time = 0
    for _ in quiet_attempts(2):
        stalled_every_time += 1
        _frozen(0.6)
    assert stalled_every_time == 2  # then the test's assertions judge the last one


def test_the_watch_sees_no_stall_in_a_quiet_wait() -> None:
    longest = []
    for _ in range(3):  # the host itself may stall once: a watch that always says so fails
        with StallWatch() as watch:
            time.sleep(0.5)
        longest.append(watch.longest_s)
        if watch.longest_s < 0.1:
            break
    assert not watch.stalled and watch.longest_s < 0.1, longest


def test_cpu_seconds_count_work_and_not_waiting() -> None:
    started = cpu_s()
    time.sleep(0.3)
    assert cpu_s() - started < 0.15
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    assert cpu_s() - started > 0.2
