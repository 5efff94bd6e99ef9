"""Helpers for the server-level tests: a fake engine that holds or fails jobs on cue, and a
real uvicorn server on loopback that exposes its app. (The in-process app and the FFmpeg-child
scan live in tests/harness.py. A module with its own name, not a conftest, so any test file can
import it whatever the collection order.)"""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
import threading
import time
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


import numpy as np
from litestar import Litestar

from gateway.app import create_app
from harness import serve_on_loopback
from gateway.engine.base import AudioChunk, SynthesisJob
from gateway.engine.fake import FakeEngine
from gateway.server.http_server import server_config
from gateway.server.services import AppServices
from gateway.settings import Settings

HOLD = "HOLD"
"""Jobs whose text contains this word are held by GatedEngine (others run freely)."""


def tone_wav(seconds: float, frequency: float = 220.0) -> bytes:
    """A tone as 24 kHz mono 16-bit WAV, made in Python (a voice upload needs no FFmpeg to make)."""
    t = np.arange(int(24_000 * seconds)) / 24_000
    samples = (0.4 * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(24_000)
        f.writeframes(samples.tobytes())
    return out.getvalue()


class GatedEngine(FakeEngine):
    """A FakeEngine that, for jobs whose text contains ``HOLD``, yields ``hold_after`` pieces
    and then waits (forever, or until ``gate`` is set). Models a stuck or slow engine."""

    def __init__(self, *, hold_after: int = 0, fail_after: int | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.hold_after = hold_after
        self.fail_after = fail_after
        """If set, held jobs raise RuntimeError after this many pieces instead of waiting."""
        self.gate = threading.Event()
        self.holding = threading.Event()
        """Set once a held job has produced its pieces and is waiting."""

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        held = any(HOLD in chunk for chunk in job.chunks)
        inner = super().synthesize(job)
        count = 0
        try:
            async for chunk in inner:
                if held and self.fail_after is not None and count >= self.fail_after:
                    raise RuntimeError("engine blew up mid-stream")
                if held and count >= self.hold_after:
                    self.holding.set()
                    while not self.gate.is_set():
                        await asyncio.sleep(0.01)
                yield chunk
                count += 1
        finally:
            await inner.aclose()


@dataclass
class Live:
    base_url: str
    app: Litestar
    engine: FakeEngine

    @property
    def services(self) -> AppServices:
        return self.app.state.services  # type: ignore[no-any-return]


@contextmanager
def live_server(
    settings: Settings,
    engine: FakeEngine,
    *,
    wait_ready: bool = True,
    guarded: bool = False,
    fd_limit: int | None = None,
    tls_client: ssl.SSLContext | None = None,
) -> Iterator[Live]:
    """The app on a real uvicorn server on 127.0.0.1 (own thread and event loop). ``guarded``:
    with the production server configuration (connection limits, read deadlines, and TLS when
    the settings name a certificate: then ``tls_client`` is the context that trusts it)."""
    app = create_app(settings, engine=engine)
    config = server_config(app, settings, fd_limit=fd_limit) if guarded else None
    try:
        with serve_on_loopback(
            app,
            ready_path="/ready" if wait_ready else "/health",
            graceful_shutdown_s=2,
            config=config,
            tls_client=tls_client,
        ) as base_url:
            yield Live(base_url=base_url, app=app, engine=engine)
    finally:
        if isinstance(engine, GatedEngine):
            engine.gate.set()


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended: what a test that bounds
    work (not waiting) measures, which a stalled host does not add to as it does to wall time."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class StallWatch:
    """A thread that sleeps ``tick_s`` at a time and keeps its longest overshoot: a host that
    stalls (CI's 2-core machines have gone silent for ~3 s) freezes it with the test, so a
    test whose assertion is a wall-clock measurement can tell a slow server from a stalled
    host, and measure again (``quiet_attempts``). A server that is slow every time still
    fails; only the host's stall is forgiven."""

    def __init__(self, tick_s: float = 0.02, stall_s: float = 0.3) -> None:
        self.tick_s, self.stall_s = tick_s, stall_s
        self.longest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stall-watch")

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            self.longest_s = max(self.longest_s, now - last - self.tick_s)
            last = now

    @property
    def stalled(self) -> bool:
        return self.longest_s >= self.stall_s

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def quiet_attempts(attempts: int = 3) -> Iterator[StallWatch]:
    """``for _ in quiet_attempts(): ...measure...``: the loop's body under a StallWatch, run
    again (up to ``attempts`` times) while the host stalled during it; the assertions after the
    loop hold the first quiet attempt, or the last."""
    for _ in range(attempts):
        with StallWatch() as watch:
            yield watch
        if not watch.stalled:
            return


def connect(base_url: str) -> socket.socket:
    """A raw TCP connection to the server at ``base_url`` (for what an HTTP client won't send)."""
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took
    (inf: it did not close within ``timeout_s``)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except (TimeoutError, socket.timeout):
        return received, float("inf")
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started
