"""CPU time by thread group: a busy named thread and a pool's busy workers are counted in
their groups, idle ones barely, the rest of the process as ``other``, and the groups add up to
the process's CPU time; the metric carries them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.exposition import generate_latest

from gateway.observability.metrics import GatewayMetrics
from gateway.observability.thread_cpu import group_of, thread_cpu_seconds

pytestmark = pytest.mark.skipif(not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clocks")


def _spin(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_pool_workers_are_one_group_and_other_threads_keep_their_names() -> None:
    assert group_of("vocoder_0") == group_of("vocoder_12") == "vocoder"
    assert group_of("vllm-engine") == "vllm-engine" and group_of("MainThread") == "MainThread"
    assert group_of("watermark-resample_3") == "watermark-resample"


def test_busy_threads_are_counted_in_their_groups() -> None:
    release = threading.Event()
    idle = threading.Thread(target=release.wait, name="idle-test", daemon=True)
    idle.start()
    done = threading.Event()

    def busy() -> None:
        _spin(0.3)
        done.set()
        release.wait()

    spinner = threading.Thread(target=busy, name="busy-test", daemon=True)
    spinner.start()
    with ThreadPoolExecutor(2, thread_name_prefix="pool-test") as pool:
        list(pool.map(lambda _: _spin(0.2), range(2)))
        done.wait(10)
        groups = thread_cpu_seconds()
        total = time.process_time()
    release.set()
    assert groups["busy-test"] >= 0.3
    assert groups["pool-test"] >= 0.4  # both workers, together
    assert groups["idle-test"] < 0.05
    assert groups["other"] >= 0.0
    assert sum(groups.values()) == pytest.approx(total, abs=0.05)


def test_the_metric_carries_each_group() -> None:
    text = generate_latest(GatewayMetrics().registry).decode()
    assert 'chatterbox_thread_cpu_seconds{threads="MainThread"}' in text
    assert 'chatterbox_thread_cpu_seconds{threads="other"}' in text
