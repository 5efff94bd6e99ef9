"""The py-spy summary the benchmark stores with each HTTP row: py-spy's raw stacks parsed per
thread (child processes apart, command lines that span lines), shares of the sampled span,
and a live sample of a real process with one busy thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ops_support import quiet_attempts

from gateway.tools import py_spy

RAW = """\
process 100:"python -m gateway serve --engine vllm";thread (0x1): MainThread;run (asyncio/base_events.py:600);_run_once (asyncio/base_events.py:1900);push (gateway/engine/vllm/vocoder_stream.py:88) 30
process 100:"python -m gateway serve --engine vllm";thread (0x1): MainThread;run (asyncio/base_events.py:600);select (selectors.py:468) 10
process 100:"python -m gateway serve --engine vllm";thread (0x2): vocoder_0;run_batch (/srv/gateway/engine/vllm/vocoder.py:380);replay (torch/cuda/graphs.py:90) 20
process 100:"python -m gateway serve --engine vllm";thread (0x3): vocoder_1;run_batch (/srv/gateway/engine/vllm/vocoder.py:380);replay (torch/cuda/graphs.py:90) 5
process 100:"python -m gateway serve --engine vllm";process 101:"python -c from multiprocessing.spawn import spawn_main
spawn_main(tracker_fd=5)";thread (0x9): MainThread;step (vllm/v1/engine/core.py:300) 50
"""


def test_raw_stacks_are_parsed_per_thread_and_process() -> None:
    threads = py_spy.parse(RAW, main_pid=100)
    assert set(threads) == {"MainThread", "vocoder_0", "vocoder_1", "pid 101: MainThread"}
    main = threads["MainThread"]
    assert main["samples"] == 40
    assert main["self"] == {"push (gateway/engine/vllm/vocoder_stream.py)": 30, "select (selectors.py)": 10}
    assert main["gateway"] == {"push (gateway/engine/vllm/vocoder_stream.py)": 30}  # only the gateway's own frames
    assert threads["vocoder_0"]["gateway"] == {"run_batch (gateway/engine/vllm/vocoder.py)": 20}  # an absolute path
    assert threads["pid 101: MainThread"]["self"] == {"step (core.py)": 50}  # its command line spanned lines


def test_the_summary_gives_shares_of_the_span_and_pools_numbered_threads() -> None:
    gil = RAW.replace(" 30\n", " 25\n").replace(" 20\n", " 5\n")
    summary = py_spy.summarize(RAW, gil, seconds=1.0, rate=100, main_pid=100)
    rows = {r["thread"]: r for r in summary["threads"]}
    assert rows["vocoder"]["threads"] == 2 and rows["vocoder"]["active_share"] == 0.25
    assert rows["MainThread"]["active_share"] == 0.4 and rows["MainThread"]["gil_share"] == 0.35
    assert rows["MainThread"]["top_self"][0] == ["push (gateway/engine/vllm/vocoder_stream.py)", 0.3]
    assert summary["gil_share"] == round((25 + 10 + 5 + 5 + 50) / 100, 3)
    assert [r["thread"] for r in summary["threads"]][0] == "pid 101: MainThread"  # the busiest first
    assert "| vocoder | 2 | 0.25 |" in py_spy.table(summary, "server")


@pytest.mark.skipif(py_spy.executable() is None, reason="py-spy is a dev dependency")
def test_a_live_process_with_one_busy_thread(tmp_path: Path) -> None:
    code = ("import threading, time\n"
            "def spin():\n"
            "    end = time.time() + 20\n"
            "    while time.time() < end: sum(range(1000))\n"
            "threading.Thread(target=spin, name='worker_1', daemon=True).start()\n"
            "time.sleep(20)\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.5)
        for _ in quiet_attempts():  # shares of the nominal span: a stalled host's lost samples, again
            summary = asyncio.run(py_spy.profile(child.pid, 2, tmp_path, "live"))
    finally:
        child.kill()
        child.wait()
    assert "error" not in summary, summary
    rows = {r["thread"]: r for r in summary["threads"]}
    assert rows["worker"]["active_share"] > 0.5 and rows["worker"]["gil_share"] > 0.5
    assert summary["gil_share"] > 0.5
    assert "MainThread" not in rows  # asleep the whole time: idle threads are not sampled


def test_a_missing_process_is_reported_not_raised(tmp_path: Path) -> None:
    summary = asyncio.run(py_spy.profile(2**22 + 7, 1, tmp_path, "gone"))
    assert "error" in summary
