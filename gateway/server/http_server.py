"""The uvicorn server the gateway runs under, with every connection limit from the settings.

One place builds it, so ``chatterbox-gateway serve`` and the tests that need a real server
run exactly the same configuration (:func:`server_config`, run by :class:`GatewayServer`):
the guarded h11 protocol (read deadlines, body rate, size and byte budget, header size,
connection cap, see :mod:`gateway.http.connection_guard`), uvicorn's keep-alive timeout, a
listen queue and an accept batch, the graceful-shutdown grace, a rate limit on
asyncio's "accept() out of system resource" log line, uvicorn's WebSocket protocol with the
same abort hook, and TLS when a certificate is configured (:mod:`gateway.http.tls`).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import structlog
import uvicorn

from gateway.http.connection_guard import GuardedWebSocketProtocol, guarded_protocol
from gateway.http.connection_limits import AcceptErrorFilter, ConnectionLimits
from gateway.http.tls import load_tls_context, tls_protocol_factory
from gateway.http.voices import VOICES_PATH, upload_body_limit
from gateway.server.shutdown import ShutdownClock
from gateway.settings import Settings

SHUTDOWN_CLOCK_STATE = "shutdown_clock"
"""``app.state`` key of the app's :class:`ShutdownClock` (see ``gateway.app``)."""


def shutdown_clock_of(app: Any, settings: Settings) -> ShutdownClock:
    state = getattr(app, "state", None)
    clock = state.get(SHUTDOWN_CLOCK_STATE) if state is not None else None
    return clock if isinstance(clock, ShutdownClock) else ShutdownClock(settings.shutdown_grace_s)


class GatewayConfig(uvicorn.Config):
    """uvicorn's configuration, and ``listen_backlog``: the connections the kernel queues for
    accept(), apart from ``backlog`` (asyncio's accept batch); None: ``backlog`` for both."""

    def __init__(self, *args: Any, listen_backlog: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listen_backlog = listen_backlog


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the kernel's listen queue and asyncio's accept batch apart.

    asyncio takes one number for both: ``listen(backlog)`` and up to ``backlog`` accept() calls
    in one turn of its loop, each a descriptor before any eviction frees one. Where
    descriptors are few the batch must be small (:class:`ConnectionLimits`' ``accept_batch``)
    but the queue need not be: a connection waiting in the kernel holds none of this process's
    descriptors, and a full queue drops the next SYN, which its client sends again only a
    second later. So once uvicorn listens, each listening socket's queue is set to
    ``listen_backlog`` (``listen()`` on a listening socket changes its queue only)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        wanted = getattr(self.config, "listen_backlog", None)
        if wanted is None:
            return
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                relisten(sock.fileno(), wanted)


def relisten(fd: int, backlog: int) -> None:
    """Set the listen queue of the listening socket ``fd`` (through a duplicate descriptor:
    the server's own socket object stays asyncio's)."""
    duplicate = socket.socket(fileno=os.dup(fd))
    try:
        duplicate.listen(backlog)
    finally:
        duplicate.close()


def server_config(app: Any, settings: Settings, *, fd_limit: int | None = None) -> GatewayConfig:
    limits = ConnectionLimits.from_settings(
        settings,
        shutdown_clock_of(app, settings),
        fd_limit=fd_limit,
        # the same body limits as the app's routes (gateway.app), applied before any body byte
        # is buffered: speech JSON and every other route max_body_bytes, uploads their own
        body_caps={VOICES_PATH: upload_body_limit(settings)},
    )
    services = getattr(getattr(app, "state", None), "services", None)
    if services is not None:
        services.connection_stats = limits.stats  # for the metrics
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
        body_min_rate_bytes_s=settings.body_min_rate_bytes_s,
        body_rate_grace_s=limits.body_rate_grace_s,
        max_pending_body_bytes=limits.max_pending_body_bytes,
        max_header_bytes=limits.max_header_bytes,
        keep_alive_timeout_s=settings.keep_alive_timeout_s,
        send_timeout_s=settings.send_timeout_s,
    )
    return GatewayConfig(
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
        backlog=limits.accept_batch,  # accepted in one turn: listen_backlog, or less where descriptors are few
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
        listen_backlog=settings.listen_backlog,  # the kernel's queue (GatewayServer)
    )


def install_accept_log_limit() -> AcceptErrorFilter:
    """Rate-limit asyncio's accept() error line (one a second, the rest counted)."""
    limiter = AcceptErrorFilter()
    logging.getLogger("asyncio").addFilter(limiter)
    return limiter
