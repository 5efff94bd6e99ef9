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
    for bad in (["--concurrency", "5000"], ["--duration", "100000"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--url", "http://127.0.0.1:1", *bad])


def test_against_a_live_server(live_server, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code = loadtest.main(
        [
            "--url", live_server.base_url, "--concurrency", "4", "--duration", "2", "--settle", "0.2",
            "--server-pid", str(os.getpid()), "--json", str(out),
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
    assert code == 1 and report["server_died_at_s"] is not None and report["server_died_at_s"] <= 5
    assert took < 20  # not the 30 s duration
