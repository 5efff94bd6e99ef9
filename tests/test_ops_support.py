"""The test helpers that tell a stalled host from a slow server: they must see a stall when
there is one and none when there is none, or the tests that lean on them measure nothing."""

from __future__ import annotations

import sys
import time

from ops_support import StallWatch, cpu_s


def test_the_watch_sees_a_process_that_could_not_run() -> None:
    # The watch thread cannot run while this thread keeps the interpreter lock: as if the
    # host had stopped the process for 0.6 s.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        with StallWatch() as watch:
            time.sleep(0.1)  # the watch is ticking
            end = time.monotonic() + 0.6
            while time.monotonic() < end:
                pass
            time.sleep(0.1)
    finally:
        sys.setswitchinterval(interval)
    assert watch.stalled and 0.4 < watch.longest_s < 5, watch.longest_s


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
