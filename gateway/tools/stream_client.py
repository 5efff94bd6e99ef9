"""One HTTP client per load stream, for the benchmark and the load test.

Both tools run hundreds of streams from one Python process. Through one shared
``httpx.AsyncClient`` every request start and end walks httpcore's whole connection pool (its
``_assign_requests_to_connections``: each connection's ``is_idle``/``is_available``, and for
every queued request every connection again), so the client's own work grows with the number
of streams. Measured on the development machine (2 cores, Python 3.11, httpx 0.29 / httpcore
1.0.9, 2026-12-04) against the fake engine, which costs the server next to nothing, streaming
pcm: one shared client carried 786 / 430 / 281-341 audio-s per s at 1 / 64 / 256 streams, its
event loop holding the GIL 0.79 of the time at 256 with a third of it in those pool walks;
a client per stream carried 715 / 842 / 961, the server then the busier process. A benchmark
whose client saturates below the server cannot show the server's ceiling (Turbo's target is
1000 audio-s per s at 256 streams), hence a client, and so a pool of one connection, per stream.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import httpx

_TLS = ssl.create_default_context()
"""One TLS context for every client: httpx builds one per client otherwise (~10 ms each)."""


def stream_client(base_url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> httpx.AsyncClient:
    """A client for one stream's requests, one after another on one kept-alive connection.
    Idle connections are dropped well before a server's keep-alive timeout (uvicorn: 5 s), so
    a request never races the server closing the connection it is about to reuse."""
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, verify=_TLS, timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0))
