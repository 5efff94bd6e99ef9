"""The load-test tool itself: it refuses non-loopback targets and unbounded runs, and against
a live server it reports requests, TTFB percentiles and server memory."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import msgspec
import pytest

from gateway.settings import Settings
from gateway.tools import loadtest


def test_refuses_hosts_that_are_not_loopback() -> None:
    with pytest.raises(loadtest.NotLoopbackError):
        loadtest.require_loopback("http://10.1.2.3:8000")
    with pytest.raises(loadtest.NotLoopbackError):
        loadtest.require_loopback("http://example.invalid:8000")
    loadtest.require_loopback("http://127.0.0.1:8000")
    loadtest.require_loopback("http://localhost:8000")
    loadtest.require_loopback("http://[::1]:8000")
    assert loadtest.main(["--url", "http://192.0.2.1:80", "--duration", "1"]) == 2


def test_runs_are_bounded() -> None:
    parser = loadtest.build_parser()
    for bad in (["--concurrency", "5000"], ["--duration", "100000"], ["--concurrency", "0"],
                ["--sample-s", "0"], ["--sample-s", "-1"], ["--sample-s", "100000"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--url", "http://127.0.0.1:1", *bad])


def test_against_a_live_server(live_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = loadtest.main(
        [
            "--url", live_server.base_url, "--concurrency", "4", "--duration", "2", "--settle", "0.2",
            "--server-pid", str(os.getpid()), "--sample-s", "0.5", "--json", str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert code == 0, report
    assert report["ok"] > 0 and report["error_count"] == 0
    assert report["ttfb_ms"]["p50"] > 0 and report["ttfb_ms"]["p95"] >= report["ttfb_ms"]["p50"]
    assert report["server_rss_mib"]["before"] > 0 and report["server_rss_mib"]["after"] > 0
    assert report["server_in_flight_after"] == 0 and report["server_ffmpeg_children_after"] == 0
    assert report["server_encoder_threads_after"] == 0
    # no GPU here: the split is there, every part unknown (never a made-up zero)
    assert set(report["gpu_split_mib"]) == {"start", "before", "after"}
    assert all(v is None for part in report["gpu_split_mib"].values() for v in part.values())

    # the memory series: a sample at the load's start, one every 0.5 s, one at its end
    series = report["memory_series"]
    times = [s["t_s"] for s in series]
    # ~6 in the 2.5 s; a stalled host leaves fewer, never more than its span allows
    assert 2 <= len(series) <= 2 + times[-1] / 0.5, series
    assert times == sorted(times), times
    assert times[0] < 0.5 and times[-1] >= 2.0, times
    assert all(s["rss_mib"] > 0 and s["tree_rss_mib"] > 0 for s in series), series
    assert all(s["allocated_mib"] is None and s["reserved_mib"] is None for s in series)  # no CUDA here
    assert report["server_rss_mib"]["peak"] == max(report["server_rss_mib"]["before"], *(s["rss_mib"] for s in series))
    growth = report["memory_growth_mib"]
    half = next(s for s in series if s["t_s"] >= 1.0)
    for key in ("rss_mib", "tree_rss_mib"):
        assert growth[key]["whole"] == round(series[-1][key] - series[0][key], 1)
        assert growth[key]["second_half"] == round(series[-1][key] - half[key], 1)
    assert growth["allocated_mib"] == growth["reserved_mib"] == {"second_half": None, "whole": None}
    # printed: the report without the series, then the series as a table and its growth
    printed = capsys.readouterr().out
    assert "memory_series" not in printed.split("memory during the load")[0]
    table = printed.split("memory during the load")[1].splitlines()[1:]
    assert len(table) == 1 + len(series) + 2 and table[-2].split()[0] == "second_half:", table


def _sample(t_s: float, rss: float | None, reserved: float | None) -> loadtest.MemorySample:
    return {"t_s": t_s, "rss_mib": rss, "tree_rss_mib": None, "gpu_used_mib": None,
            "allocated_mib": 100.0, "reserved_mib": reserved}


@pytest.mark.parametrize(
    ("series", "rss", "reserved"),
    [
        # a working set that fills early: growth over the whole load, none in its second half
        ([_sample(0, 100, 200), _sample(5, 150, 300), _sample(10, 150, 300), _sample(15, 150, 300)],
         {"second_half": 0.0, "whole": 50.0}, {"second_half": 0.0, "whole": 100.0}),
        # a leak: growing in both
        ([_sample(0, 100, 200), _sample(5, 110, 250), _sample(10, 120, 300), _sample(15, 130, 350)],
         {"second_half": 10.0, "whole": 30.0}, {"second_half": 50.0, "whole": 150.0}),
        # an end unknown: unknown, never a made-up number
        ([_sample(0, None, 200), _sample(10, 120, 300), _sample(15, 130, None)],
         {"second_half": 10.0, "whole": None}, {"second_half": None, "whole": None}),
        # one sample in the second half (a short load, or the server died): no second half
        ([_sample(0, 100, 200), _sample(4, 110, 250), _sample(10.5, 120, 300)],
         {"second_half": None, "whole": 20.0}, {"second_half": None, "whole": 100.0}),
        ([], {"second_half": None, "whole": None}, {"second_half": None, "whole": None}),
    ],
)
def test_memory_growth(series: list[loadtest.MemorySample], rss: dict, reserved: dict) -> None:
    growth = loadtest.memory_growth(series, half_s=10.0)
    assert growth["rss_mib"] == rss and growth["reserved_mib"] == reserved
    assert growth["allocated_mib"]["second_half"] in (0.0, None) and set(growth) == set(loadtest.QUANTITIES)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # every live test here overloads on purpose: one slot, no queue, several clients
    return msgspec.structs.replace(settings, max_in_flight=1, max_queued=0)


def test_429s_are_counted_apart_from_errors(live_server, tmp_path: Path) -> None:
    report = asyncio.run(
        loadtest.run(
            loadtest.build_parser().parse_args(
                ["--url", live_server.base_url, "--concurrency", "6", "--duration", "2", "--settle", "0"]
            )
        )
    )
    assert report["rejected_429"] > 0
    assert report["error_count"] == 0 and report["ok"] > 0


def test_a_server_that_dies_ends_the_run(tmp_path: Path) -> None:
    """A dead server (--server-pid) ends the run at once: its report says when, and the exit
    status fails, instead of a full duration of connection errors."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

        async def run() -> int:
            async def kill() -> None:
                await asyncio.sleep(1.0)
                server.kill()

            killer = asyncio.create_task(kill())
            code = await asyncio.to_thread(loadtest.main, [
                "--url", f"http://127.0.0.1:{port}", "--concurrency", "2", "--duration", "30",
                "--server-pid", str(server.pid), "--settle", "0", "--json", str(tmp_path / "r.json")])
            await killer
            return code

        t0 = time.monotonic()
        code = asyncio.run(run())
        took = time.monotonic() - t0
    finally:
        server.kill()
        server.wait()
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and report["server_died_at_s"] is not None and report["server_died_at_s"] <= 15  # killed at 1 s of 30
    assert took < 20  # not the 30 s duration
