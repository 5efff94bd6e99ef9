"""The app on a real uvicorn server on 127.0.0.1, in its own thread and event loop.

One helper for every test that needs a live server (the fake-engine HTTP tests, the ops
tests, the end-to-end tests on real engines). A module with its own name, not a conftest,
so any test file can import it whatever the collection order.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from litestar import Litestar


@contextmanager
def serve_on_loopback(
    app: Litestar,
    *,
    ready_path: str = "/ready",
    timeout_s: float = 15.0,
    poll_s: float = 0.05,
    graceful_shutdown_s: float | None = None,
    join_s: float = 15.0,
) -> Iterator[str]:
    """Yield the server's base URL once ``ready_path`` answers 200; stop the server after.

    Fails fast when the server thread dies or ``/ready`` reports a failed engine."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=graceful_shutdown_s
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                answer = httpx.get(f"{base_url}{ready_path}", timeout=2)
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
