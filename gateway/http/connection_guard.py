"""What a connection may hold before the app sees a request: read deadlines and a cap.

uvicorn's h11 protocol times out only idle keep-alive connections. A client that sends its
headers (or its body) one byte a second, or opens a connection and sends nothing, is kept
forever, and connections are not capped: a few hundred such sockets use up the process's
file descriptors, and then asyncio's accept loop logs "out of system resource" thousands of
times a second. :class:`GuardedH11Protocol` adds, per connection:

- **header deadline** (``header_timeout_s``): from the connection's start, or from the first
  byte of the next request on a kept-alive connection, to the end of the headers; past it
  the client gets ``408`` and the connection is closed;
- **body deadline** (``body_timeout_s``): from the end of the headers to the end of the
  body; past it the connection is closed, which the app sees as a disconnect;
- **connection cap** (``max_connections``, kept below the descriptor limit): at the cap the
  oldest connection still waiting for its headers is closed to make room (so an idle flood
  cannot lock out a health check); when every connection is serving a request, the new one
  gets ``503`` and is closed at once;
- an ``abort`` hook in the request scope (``scope["extensions"]["gateway.connection"]``) so
  the response guard can drop a socket whose client stopped reading without waiting for
  its write buffer to drain.

None of these run before accept(): past the cap a connection costs one accept and one close.

A connection upgraded to a WebSocket (the ElevenLabs face's ``stream-input``) leaves the h11
protocol for uvicorn's WebSocket protocol; it still counts against the cap (both keep their
connections in the same set) but can never be evicted. :class:`GuardedWebSocketProtocol` puts
the same ``abort`` hook in the socket's scope, so the socket handler can drop a client that
stopped reading its messages (``send_timeout_s``) without waiting for the buffer to drain.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway.server.shutdown import ShutdownClock
from gateway.settings import Settings

CONNECTION_EXTENSION = "gateway.connection"
"""Scope extension holding ``{"abort": callable}`` for the connection serving the request."""

# Descriptors kept free for what is not a client socket: log files, the voices directory,
# three pipes per FFmpeg child, the engine's own files.
FD_RESERVE_BASE = 64
FD_RESERVE_PER_REQUEST = 4

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: 29\r\n\r\nToo many open connections.\r\n"
)
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 28\r\n\r\nRequest headers timed out.\r\n"
)

_log = logging.getLogger("gateway.http.connections")


def descriptor_limit() -> int:
    """The process's soft limit on open files (RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (what a process may do for itself); the
    new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # a container may forbid it: the connection cap follows the limit we have
    return soft


class Abortable(Protocol):
    def abort(self) -> None: ...


@dataclass
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    shutdown_clock: ShutdownClock
    waiting: dict[Abortable, None] = field(default_factory=dict)
    """Connections waiting for request headers (or, with TLS, for the end of their handshake),
    oldest first (eviction order)."""
    handshaking: int = 0
    """TLS connections accepted whose handshake has not ended (:mod:`gateway.http.tls`): they
    count toward ``max_connections`` before uvicorn knows of them."""
    refused: int = 0
    evicted: int = 0
    timed_out: int = 0
    _last_warning: float = 0.0

    @classmethod
    def from_settings(
        cls, settings: Settings, shutdown_clock: ShutdownClock, fd_limit: int | None = None
    ) -> ConnectionLimits:
        fds = descriptor_limit() if fd_limit is None else fd_limit
        room = fds - FD_RESERVE_BASE - FD_RESERVE_PER_REQUEST * settings.max_in_flight
        return cls(
            max_connections=max(1, min(settings.max_connections, room)),
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            shutdown_clock=shutdown_clock,
        )

    def evict_oldest_waiting(self, keep: Abortable) -> bool:
        """Close the oldest connection still waiting for headers (or a handshake), other than
        ``keep``, to make room for a new one; False when there is none."""
        for victim in self.waiting:
            if victim is not keep:
                self.evicted += 1
                self.warn("connection_evicted", waiting=len(self.waiting))
                victim.abort()
                return True
        return False

    def warn(self, event: str, **fields: Any) -> None:
        """At most one warning a second: a flood of refusals must not become a log flood."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            _log.warning(
                "%s (max_connections=%d, refused=%d, evicted=%d, timed_out=%d) %s",
                event, self.max_connections, self.refused, self.evicted, self.timed_out,
                " ".join(f"{k}={v}" for k, v in fields.items()),
            )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the read deadlines and the cap of the module docstring."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._exposed_cycle: object = None

    # ---- connection lifetime --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = len(self.connections) + self.limits.handshaking
        if open_now > self.limits.max_connections and not self.limits.evict_oldest_waiting(keep=self):
            self.limits.refused += 1
            self.limits.warn("connection_refused", open=len(self.connections))
            self.connections.discard(self)
            transport.write(_REFUSAL)
            transport.close()
            return
        self._enter("headers", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request_state()

    def shutdown(self) -> None:
        """Server shutdown: idle connections close now (uvicorn); a response still running is
        dropped like a disconnect just before the grace ends, so its body is closed (engine
        job, FFmpeg, slot) by the normal path instead of uvicorn cancelling the task."""
        clock = self.limits.shutdown_clock
        clock.start()
        busy = self.cycle is not None and not self.cycle.response_complete
        self._leave()
        super().shutdown()
        if busy:
            self.loop.call_later(clock.abort_in(), self.abort)

    # ---- deadlines --------------------------------------------------------------------------

    def _follow_request_state(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._leave()
            return
        if self.cycle is not None and self.cycle is not self._exposed_cycle:
            self._exposed_cycle = self.cycle
            # The app task was created but has not run yet: it will see this in its scope.
            self.cycle.scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = {"abort": self.abort}
        state = self.conn.their_state
        if state is h11.IDLE:
            # waiting for the next request's headers (uvicorn's shorter keep-alive timer also
            # runs until its first byte): the deadline counts from the previous response's end
            if self._phase != "headers":
                self._enter("headers", self.limits.header_timeout_s)
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._enter("body", self.limits.body_timeout_s)
        else:
            self._leave()

    def _enter(self, phase: str, timeout_s: float) -> None:
        self._leave()
        self._phase = phase
        self._timer = self.loop.call_later(timeout_s, self._expired)
        if phase == "headers":
            self.limits.waiting[self] = None

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None
        self.limits.waiting.pop(self, None)

    def _expired(self) -> None:
        phase = self._phase
        self._timer = None
        self._leave()
        if self.transport.is_closing():
            return
        self.limits.timed_out += 1
        self.limits.warn("connection_read_timeout", phase=phase)
        if phase == "headers" and self.conn.our_state is h11.IDLE:
            self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()
        else:
            # mid-body: the app is reading, so it hears of this as a disconnect
            self.abort()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes included (a reader that stopped reading);
        uvicorn then reports ``http.disconnect`` to the request being served."""
        self._leave()
        if self.transport is not None:
            self.transport.abort()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with the ``abort`` hook in each socket's scope."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the handshake was accepted (else no app task is started)
            scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = {"abort": self.abort}

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def keepalive_timeout(self) -> None:
        """A peer that stopped answering pings is gone: close with 1001 ("going away"), not
        uvicorn's 1011, which clients read as a server fault."""
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.fail(1001, "keepalive ping timeout")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to one server's limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class AcceptErrorFilter(logging.Filter):
    """Let through one asyncio "accept() out of system resource" line a second, counting the
    rest: past the descriptor limit asyncio logs one per attempt, thousands a second."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.suppressed = 0
        self._last = -float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if "out of system resource" not in record.getMessage():
            return True
        now = self.clock()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        self._last = now
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} more suppressed)"
            self.suppressed = 0
        return True
