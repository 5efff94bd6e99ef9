"""Graceful shutdown of a real server process (``gateway.cli.run_server``, as ``serve`` runs
it): on SIGTERM it stops accepting, lets in-flight streams finish within shutdown_grace_s,
cancels the rest (engine job aborted, FFmpeg killed), closes the engine and exits."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from ops_support import StallWatch, quiet_attempts

REPO = Path(__file__).resolve().parents[2]

_SERVER = """
import json, os, sys
from pathlib import Path
from gateway.app import create_app
from gateway.cli import run_server
from gateway.engine.fake import FakeEngine
from gateway.observability.logging import configure_logging
from gateway.settings import load_settings


class ReportingEngine(FakeEngine):
    async def close(self):
        await super().close()
        # the last thing the app does: say what happened to the work, and which children remain
        children = []
        for task in Path("/proc/self/task").iterdir():
            children += (task / "children").read_text().split()
        print("REPORT " + json.dumps({"closed": self.closed, "cancelled": self.cancelled,
                                      "completed": self.completed, "children": children}), flush=True)


settings = load_settings(environ={}, overrides=json.loads(sys.argv[1]))
configure_logging(settings)
run_server(create_app(settings, engine=ReportingEngine(piece_delay_s=float(sys.argv[2]))), settings)
"""

# uvicorn re-raises the signal it handled once shutdown is complete: exiting "by SIGTERM"
# after a graceful shutdown is the normal end (as for any well-behaved service).
CLEAN_EXIT = {0, -signal.SIGTERM}

TEXT = "This sentence is spoken slowly, so that the server is still streaming it when it is told to stop. " * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(
        self, tmp_path: Path, *, grace_s: float, piece_delay_s: float, preexec_fn=None, **settings: object  # type: ignore[no-untyped-def]
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        overrides = {
            "engine": "fake",
            "port": self.port,
            "cache_dir": str(tmp_path / "cache"),
            "voices_dir": str(tmp_path / "voices"),
            "shutdown_grace_s": grace_s,
            "max_speech_tokens": 1000,
            "log_format": "json",
            "max_client_share": 1.0,  # many streams from 127.0.0.1, one client
            **settings,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(overrides), str(piece_delay_s)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.lines:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def report(self) -> dict[str, object]:
        self._reader.join(timeout=5)
        reports = [line for line in self.lines if line.startswith("REPORT ")]
        assert reports, "\n".join(self.lines[-30:])
        return json.loads(reports[-1][len("REPORT "):])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _stream_in_thread(base_url: str, result: dict[str, object], first_bytes: threading.Event) -> None:
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "mp3"}
    received = b""
    try:
        with httpx.stream("POST", f"{base_url}/v1/audio/speech", json=body, timeout=60) as response:
            result["status"] = response.status_code
            for data in response.iter_raw():
                received += data
                first_bytes.set()
        result["complete"] = True
    except httpx.HTTPError as exc:
        result["error"] = type(exc).__name__
    finally:
        result["bytes"] = received
        first_bytes.set()


@pytest.mark.slow
def test_sigterm_lets_in_flight_streams_finish_within_grace(tmp_path: Path, valid_audio) -> None:
    server = Server(tmp_path, grace_s=20, piece_delay_s=0.03)
    try:
        result: dict[str, object] = {}
        first = threading.Event()
        client = threading.Thread(target=_stream_in_thread, args=(server.base_url, result, first))
        client.start()
        assert first.wait(20)
        sent_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{server.base_url}/health", timeout=2)
        client.join(30)
        assert result.get("complete") and result["status"] == 200, result.get("error")
        valid_audio(result["bytes"], "mp3")
        assert server.proc.wait(20) in CLEAN_EXIT
        assert time.monotonic() - sent_at < 20
        report = server.report()
        assert report["closed"] is True
        assert len(report["completed"]) == 1 and report["cancelled"] == []
        assert report["children"] == []
        events = [e["event"] for e in server.events()]
        assert "shutdown_drained" in events and "engine_closed" in events
        assert events.index("engine_closed") > events.index("shutdown_drained")
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_cancels_streams_past_the_grace_period(tmp_path: Path) -> None:
    server = Server(tmp_path, grace_s=1.0, piece_delay_s=0.3)
    try:
        result: dict[str, object] = {}
        first = threading.Event()
        client = threading.Thread(target=_stream_in_thread, args=(server.base_url, result, first))
        client.start()
        assert first.wait(30)
        sent_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) in CLEAN_EXIT
        stopped_after = time.monotonic() - sent_at
        assert stopped_after < 15.0, stopped_after  # 1 s grace, not the ~30 s the stream needed
        client.join(10)
        assert not result.get("complete")  # the stream was cut, not finished
        report = server.report()
        assert report["closed"] is True
        assert len(report["cancelled"]) == 1 and report["completed"] == []
        assert report["children"] == []  # its FFmpeg process was killed and reaped
        lines = [e for e in server.events() if e.get("event") == "request" and e.get("path") == "/v1/audio/speech"]
        assert lines and lines[0]["outcome"] in {"cancelled", "error"}
    finally:
        server.stop()


def _stalled_reader(port: int) -> socket.socket:
    """A long wav request from a socket with a tiny receive buffer that is never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(
        {"model": "tts-1", "voice": "alloy", "input": TEXT * 10, "response_format": "wav", "speed": 0.25}
    ).encode()
    sock.sendall(
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


@pytest.mark.slow
def test_sigterm_with_slow_readers_ends_within_the_grace_without_tracebacks(tmp_path: Path) -> None:
    """Streams blocked on clients that stopped reading are dropped like disconnects inside the
    grace (not cancelled after it, then waited for again by the lifespan)."""
    grace_s = 3.0
    server = Server(tmp_path, grace_s=grace_s, piece_delay_s=0.0, send_timeout_s=120.0, max_speech_tokens=300)
    readers = [_stalled_reader(server.port) for _ in range(4)]
    try:
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.base_url}/metrics", timeout=2).text.count("chatterbox_in_flight_requests 4.0") == 0:
            assert time.monotonic() < deadline, "the stalled requests did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # their sockets fill up
        sent_at = time.monotonic()
        with StallWatch() as watch:
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(20) in CLEAN_EXIT
        stopped_after = time.monotonic() - sent_at
        assert stopped_after < grace_s + 10, stopped_after  # within the grace, not after the 120 s send timeout
        report = server.report()
        assert len(report["cancelled"]) == 4 and report["children"] == []
        assert not [line for line in server.lines if "Exception in ASGI application" in line or "Traceback" in line]
        if not watch.stalled:  # a host stalled across the grace's end wakes the drain past it
            assert stopped_after < grace_s + 1.5, stopped_after
            assert "shutdown_grace_exceeded" not in [e["event"] for e in server.events()]
    finally:
        for sock in readers:
            sock.close()
        server.stop()


def low_fd_limit() -> None:
    """A server child's descriptors: 128, soft = hard, so the server cannot raise them."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def test_running_out_of_descriptors_means_refusals_not_a_log_flood(tmp_path: Path) -> None:
    """With 128 descriptors (soft = hard, so the server cannot raise it), 400 idle connections:
    the cap sits below the limit, the oldest idle ones are evicted, /health still answers and
    asyncio's accept() error is not logged thousands of times."""
    server = Server(tmp_path, grace_s=1.0, piece_delay_s=0.0, preexec_fn=low_fd_limit, max_in_flight=4, header_timeout_s=60)
    opened: list[socket.socket] = []
    try:
        for _ in range(400):
            try:
                opened.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        for _ in quiet_attempts():  # a 1 s accept pause is wall time: a stalled host measures again
            started = time.monotonic()
            assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
            took = time.monotonic() - started
        assert took < 1.0, took
    finally:
        for sock in opened:
            sock.close()
        server.stop()
    flood = [line for line in server.lines if "out of system resource" in line]
    assert len(flood) <= 3, len(flood)
    limits = [e for e in server.events() if e.get("event") == "connection_limits"]
    assert limits and limits[0]["max_connections"] < 128


@pytest.mark.parametrize("fd_limit", [128, 256, 1024, 4096, 1_048_576])
@pytest.mark.parametrize("max_in_flight", [4, 64])
def test_the_accept_batches_in_transit_fit_the_descriptors_kept_for_them(fd_limit: int, max_in_flight: int, tmp_path: Path) -> None:
    """Connections under the cap, evicted ones held, and the accept batches open beyond the cap
    (three at once, see ACCEPT_BATCHES_IN_TRANSIT) leave half the base reserve and the requests'
    FFmpeg pipes free; with descriptors to spare the batch is the listen backlog itself."""
    from gateway.http.connection_limits import ACCEPT_BATCHES_IN_TRANSIT, FD_RESERVE_BASE, FD_RESERVE_PER_REQUEST, ConnectionLimits
    from gateway.server.shutdown import ShutdownClock
    from gateway.settings import Settings

    settings = Settings(max_in_flight=max_in_flight, cache_dir=str(tmp_path))
    limits = ConnectionLimits.from_settings(settings, ShutdownClock(1.0), fd_limit=fd_limit)
    if fd_limit - FD_RESERVE_BASE - FD_RESERVE_PER_REQUEST * max_in_flight <= 0:
        return  # below the reserve: one connection at a time, nothing to check
    most = limits.max_connections + limits.max_held_evicted + ACCEPT_BATCHES_IN_TRANSIT * limits.accept_batch
    assert most <= fd_limit - FD_RESERVE_BASE // 2 - FD_RESERVE_PER_REQUEST * max_in_flight
    assert limits.accept_batch >= 1
    if fd_limit >= 65_536:
        assert limits.accept_batch == settings.listen_backlog


def test_a_flood_from_many_threads_never_runs_the_server_out_of_descriptors(tmp_path: Path) -> None:
    """128 descriptors, 8 threads opening 100 connections each as fast as they can: asyncio
    accepts a batch a turn while earlier batches wait for their evictions to close older
    sockets. The batches stay within the descriptors kept for them: no accept() fails (each
    failure stops all accepting for a second; batches of 32 failed five times in such a flood)."""
    server = Server(tmp_path, grace_s=1.0, piece_delay_s=0.0, preexec_fn=low_fd_limit, max_in_flight=4, header_timeout_s=60)
    opened: list[socket.socket] = []
    lock = threading.Lock()

    def flood() -> None:
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            except OSError:
                continue  # a SYN dropped thrice (the queue full each time): the flood goes on
            with lock:
                opened.append(sock)

    try:
        threads = [threading.Thread(target=flood) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(opened) > 400
        time.sleep(1.0)  # what the kernel still queues is accepted (and evicted) meanwhile
        for _ in quiet_attempts():  # a 1 s accept pause is wall time: a stalled host measures again
            started = time.monotonic()
            assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
            took = time.monotonic() - started
        assert took < 1.0, took  # no accept pause, no SYN sent twice
    finally:
        for sock in opened:
            sock.close()
        server.stop()
    assert [line for line in server.lines if "out of system resource" in line] == []


def test_the_kernel_queues_listen_backlog_connections_while_the_server_is_busy(tmp_path: Path) -> None:
    """With few descriptors asyncio accepts 10 connections a turn; the kernel still queues
    ``listen_backlog`` of them while the process does not run (stopped here), and those that
    then ask are answered."""
    server = Server(tmp_path, grace_s=1.0, piece_delay_s=0.0, preexec_fn=low_fd_limit, max_in_flight=4, listen_backlog=64)
    opened: list[socket.socket] = []
    server.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(40):  # > the accept batch (10), < the queue (64)
            opened.append(socket.create_connection(("127.0.0.1", server.port), timeout=0.5))
    finally:
        server.proc.send_signal(signal.SIGCONT)
    try:
        for sock in opened[:4]:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for sock in opened[:4]:
            sock.settimeout(5)
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for sock in opened:
            sock.close()
        server.stop()


def test_drain_refuses_new_work_and_waits_for_admitted(tmp_path: Path) -> None:
    """The lifespan half on its own: queued/new requests are refused, admitted ones awaited."""
    import asyncio

    from gateway.server.services import AppServices
    from gateway.settings import Settings
    from gateway.server.shutdown import drain

    async def scenario() -> None:
        services = AppServices(Settings(max_in_flight=1, max_queued=1, cache_dir=str(tmp_path)))
        slot = await services.admission.acquire()
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, slot.release)
        started = time.monotonic()
        assert await drain(services, 30.0) is True
        assert 0.15 < time.monotonic() - started < 15.0  # when the slot came back, not the 30 s
        with pytest.raises(Exception) as info:
            await services.admission.acquire()
        assert getattr(info.value, "status_code", None) == 503
        stuck = AppServices(Settings(cache_dir=str(tmp_path)))
        await stuck.admission.acquire()
        started = time.monotonic()
        assert await drain(stuck, 0.2) is False
        assert time.monotonic() - started < 10.0  # at its 0.2 s, not held by the stuck slot

    asyncio.run(scenario())
