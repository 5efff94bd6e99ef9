"""How tests run the app: in process (ASGI, with its lifespan) or on a real uvicorn server on
127.0.0.1 (own thread and event loop).

Shared by the HTTP tests, the ops tests and the end-to-end tests on real engines. A module
with its own name, not a conftest, so any test file can import it whatever the collection
order.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from litestar import Litestar

from gateway.app import create_app
from gateway.engine.base import Engine
from gateway.server.http_server import GatewayServer
from gateway.settings import Settings


@asynccontextmanager
async def run_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Drive the app's ASGI lifespan on the current loop (httpx's ASGITransport does not)."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))  # type: ignore[arg-type]
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"app failed to start: {started}")
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await from_app.get()
        await task


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.get("/ready")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("engine did not become ready")
        await asyncio.sleep(0.02)


@dataclass
class InProcess:
    app: Litestar
    engine: Any
    http: httpx.AsyncClient
    """Raw HTTP against the app (for what the SDK cannot send: malformed JSON, wrong method)."""
    sdk: openai.AsyncOpenAI


@asynccontextmanager
async def in_process(settings: Settings, engine: Engine, *, ready: bool = True) -> AsyncIterator[InProcess]:
    """The app with its lifespan (once the engine is ready, unless ``ready=False``); raw httpx
    and the OpenAI SDK over an ASGI transport."""
    app = create_app(settings, engine=engine)
    async with run_lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            if ready:
                await wait_ready(http)
            sdk = openai.AsyncOpenAI(api_key="test", base_url="http://gateway.test/v1", http_client=http, max_retries=0)
            yield InProcess(app=app, engine=engine, http=http, sdk=sdk)


@contextmanager
def serve_on_loopback(
    app: Litestar,
    *,
    ready_path: str = "/ready",
    timeout_s: float = 15.0,
    poll_s: float = 0.05,
    graceful_shutdown_s: float | None = None,
    join_s: float = 15.0,
    config: uvicorn.Config | None = None,
    tls_client: ssl.SSLContext | None = None,
) -> Iterator[str]:
    """Yield the server's base URL once ``ready_path`` answers 200; stop the server after.

    ``config``: the server's configuration (``gateway.server.http_server.server_config``, to
    run with the production connection limits); default: plain uvicorn. ``tls_client``: the
    server speaks TLS (its config has a certificate); the URL is https:// and readiness is
    polled with this client context.
    Fails fast when the server thread dies or ``/ready`` reports a failed engine."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    scheme = "https" if tls_client is not None else "http"
    base_url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    if config is None:
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=graceful_shutdown_s
        )
    server = GatewayServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                answer = httpx.get(f"{base_url}{ready_path}", timeout=2, verify=tls_client or True)
                if answer.status_code == 200:
                    break
                if answer.status_code == 503 and "failed" in answer.json()["error"]["message"]:
                    raise RuntimeError(f"the engine failed to load: {answer.text}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server did not answer 200 on {ready_path} within {timeout_s} s")
            time.sleep(poll_s)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=join_s)
        sock.close()


def ffmpeg_children(pid: int | None = None) -> set[int]:
    """FFmpeg processes whose parent is ``pid`` (default: this process, whose threads run the
    in-process and loopback servers), zombies included: an exited but unreaped FFmpeg leaks."""
    parent = pid or os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # already gone
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and comm.startswith("ffmpeg"):
            found.add(int(entry.name))
    return found


def encoder_threads() -> set[str]:
    """In-process encoder worker threads still alive (the in-process route's FFmpeg children)."""
    from gateway.audio.pyav_encoder import THREAD_NAME_PREFIX

    return {t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX)}


def live_encoders() -> set[str]:
    """Every encoder still alive in this process, whichever route runs it: FFmpeg children
    (zombies included) and in-process encoder threads. Empty once every stream is released."""
    return {f"ffmpeg pid {pid}" for pid in ffmpeg_children()} | {f"thread {name}" for name in encoder_threads()}


@dataclass
class CliRun:
    process: subprocess.Popen[str]
    base_url: str
    output: str = ""
    """All it printed (stdout and stderr), once it has stopped."""


@contextmanager
def cli_serve(
    flags: list[str], cwd: Path, *, ready_timeout_s: float = 30.0, stop_timeout_s: float = 20.0, env: dict[str, str] | None = None
) -> Iterator[CliRun]:
    """``chatterbox-gateway serve FLAGS --port PORT`` as a user starts it, once ``/ready`` says
    200; stopped with SIGTERM after (killed if it does not stop within ``stop_timeout_s``).
    Its output is read as it comes (as a process manager would): a pipe nobody drains fills
    after 64 KiB and then blocks the server's next log line, its event loop with it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("chatterbox-gateway", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "gateway"]
    process = subprocess.Popen(
        [*command, "serve", *flags, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env=env,
    )
    run = CliRun(process=process, base_url=f"http://127.0.0.1:{port}")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{run.base_url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            reader.join(5)
            raise RuntimeError(f"server did not start: {''.join(lines)}")
        yield run
    finally:
        process.terminate()
        try:
            process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(30)  # the pipe ends with the process (and any child that inherited it)
        run.output = "".join(lines)
