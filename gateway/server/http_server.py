"""The uvicorn server the gateway runs under, with every connection limit from the settings.

One place builds it, so ``chatterbox-gateway serve`` and the tests that need a real server
run exactly the same configuration: the guarded h11 protocol (read deadlines, connection
cap, see :mod:`gateway.http.connection_guard`), uvicorn's keep-alive timeout and header
size limit, a listen backlog, the graceful-shutdown grace, a rate limit on asyncio's
"accept() out of system resource" log line, and TLS when a certificate is configured
(:mod:`gateway.http.tls`).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
import uvicorn

from gateway.http.connection_guard import AcceptErrorFilter, ConnectionLimits, GuardedWebSocketProtocol, guarded_protocol
from gateway.http.tls import load_tls_context, tls_protocol_factory
from gateway.server.shutdown import ShutdownClock
from gateway.settings import Settings

SHUTDOWN_CLOCK_STATE = "shutdown_clock"
"""``app.state`` key of the app's :class:`ShutdownClock` (see ``gateway.app``)."""


def shutdown_clock_of(app: Any, settings: Settings) -> ShutdownClock:
    state = getattr(app, "state", None)
    clock = state.get(SHUTDOWN_CLOCK_STATE) if state is not None else None
    return clock if isinstance(clock, ShutdownClock) else ShutdownClock(settings.shutdown_grace_s)


def server_config(app: Any, settings: Settings, *, fd_limit: int | None = None) -> uvicorn.Config:
    limits = ConnectionLimits.from_settings(settings, shutdown_clock_of(app, settings), fd_limit=fd_limit)
    protocol: Any = guarded_protocol(limits)
    tls_context = load_tls_context(settings)
    if tls_context is not None:
        # TLS runs in the protocol (bounded handshake, counted connections), not in uvicorn:
        # see gateway.http.tls. (uvicorn's own start-up line therefore says http://.)
        protocol = tls_protocol_factory(protocol, tls_context, limits)
    structlog.get_logger("gateway.server").info(
        "connection_limits",
        tls=tls_context is not None,
        max_connections=limits.max_connections,
        header_timeout_s=limits.header_timeout_s,
        body_timeout_s=limits.body_timeout_s,
        keep_alive_timeout_s=settings.keep_alive_timeout_s,
        send_timeout_s=settings.send_timeout_s,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        # The connection guard and the accept() log limit are built on asyncio's own loop and
        # transports; uvloop (which Ray's extra pulls in) would be picked by "auto" otherwise.
        loop="asyncio",
        log_config=None,  # configure_logging owns the handlers
        access_log=False,  # one canonical line per request comes from the app
        lifespan="on",
        backlog=settings.listen_backlog,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
        # X-Forwarded-For names the client only behind a proxy the operator listed (uvicorn
        # would otherwise believe it from 127.0.0.1, letting a local client pick its identity)
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        # WebSockets (the ElevenLabs face): the abort hook for slow readers; a message larger
        # than the limit is refused by the protocol (close 1009) before it is buffered; no
        # per-message compression (base64 audio hardly compresses, and it costs CPU per byte)
        ws=GuardedWebSocketProtocol,
        ws_max_size=settings.elevenlabs_max_message_bytes,
        ws_per_message_deflate=False,
    )


def install_accept_log_limit() -> AcceptErrorFilter:
    """Rate-limit asyncio's accept() error line (one a second, the rest counted)."""
    limiter = AcceptErrorFilter()
    logging.getLogger("asyncio").addFilter(limiter)
    return limiter
