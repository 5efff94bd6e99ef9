"""What a connection may hold before the app sees its whole request: deadlines, bytes, a cap.

uvicorn's h11 protocol times out only idle keep-alive connections, caps neither connections
nor the bytes of bodies still arriving, and checks the header size only when the headers come
in pieces. A client that sends its headers or its body a byte at a time, opens connections
and sends nothing, or starts many large bodies and never finishes them, would hold sockets,
file descriptors and memory for as long as it likes. :class:`GuardedH11Protocol` gives every
connection one phase at a time, each with its bound:

- **headers** (``header_timeout_s``): from the connection's start, or from the previous
  response's end on a kept-alive connection, to the end of the headers; past it ``408``.
  Headers larger than ``max_header_bytes`` get ``431`` however they arrive (h11 checks only
  headers that come in pieces);
- **body** (:mod:`gateway.http.body_pace`): the body must be in within ``body_timeout_s`` and
  at ``body_min_rate_bytes_s`` on average after ``body_rate_grace_s`` (stretched by up to
  :data:`GRACE_JITTER` at random, so bodies started together are not cut together); past
  either, ``408``.
  A body larger than its route takes (``max_body_bytes``, or the path's entry in
  ``body_caps``: uploads) gets ``413`` from its ``Content-Length``, before a byte of it is
  read. The bytes of every unfinished body count against one budget
  (``max_pending_body_bytes``), released when the body ends; the body that would pass it gets
  ``503`` (``Retry-After``). Sockets are read :data:`READ_SIZE` at a time.
  The app is not started until the body is in, or until it must take the body (uvicorn
  buffers 64 KiB, or the client waits for ``100 Continue``): a request cut before that costs
  no app work at all (no middleware, no handler, no log line: the connection warnings count
  it), which is what keeps a flood of half-sent requests cheap;
- **app**: the request is whole and the app is answering; the response guard
  (:mod:`gateway.http.response_guard`) bounds this phase;
- **linger**: the response went out before the body came in (a ``401`` for a request without
  a key, a ``413``, or one of the answers above). The rest of the body is never read: the
  write side is shut, what still arrives is dropped, and the socket is closed after
  :data:`LINGER_S` (at once when the client closes, or past :data:`LINGER_MAX_BYTES`), long
  enough for the client to read the answer before a reset could discard it.

The **connection cap** (``max_connections``, kept below the descriptor limit): at the cap one
connection that is not being served is closed to make room (see
:meth:`GuardedH11Protocol._make_room`: lingering ones first, then idle ones, then the oldest
half-sent requests; a just-opened connection such as a health check's last), so a flood of
idle or half-sent requests cannot lock out ``/health``; only when every connection is in the
app phase is the new one refused with ``503``. An evicted connection is held silent for
:data:`EVICTED_HOLD_S` before it closes (see :meth:`GuardedH11Protocol._evict`): a client that
reconnects the moment it is dropped would otherwise start a chain of evictions as fast as the
CPU allows. None of this runs before accept(): past the cap a connection costs one accept and
one close.

Answers written here carry the OpenAI error envelope; the app, still waiting for the body,
sees a disconnect, and :class:`~gateway.http.connection_hook.ConnectionHook` tells its log
line what was sent.

With TLS (:mod:`gateway.http.tls`) a connection is counted from its accept, while its
handshake runs (``limits.handshakes``), and a handshaking one is evicted like one waiting for
its headers: :func:`make_room` weighs both.

A connection upgraded to a WebSocket (the ElevenLabs face's ``stream-input``) leaves the h11
protocol for uvicorn's WebSocket protocol; it still counts against the cap (both keep their
connections in the same set) but can never be evicted. :class:`GuardedWebSocketProtocol` puts
a :class:`~gateway.http.connection_hook.ConnectionHook` in the socket's scope, so the socket
handler can drop a client that stopped reading its messages (``send_timeout_s``) without
waiting for the buffer to drain.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway.errors import ClientTimeoutError, GatewayError, HeadersTooLargeError, PayloadTooLargeError, ServerBusyError
from gateway.http.body_pace import BodyPace, ReadPauseClock
from gateway.http.connection_hook import CONNECTION_EXTENSION, Answer, ConnectionHook, connection_hook
from gateway.http.connection_limits import ConnectionLimits
from gateway.http.raw_responses import raw_error_response

LINGER_S = 2.0
"""How long a connection answered before its body came stays open, dropping what arrives."""
LINGER_MAX_BYTES = 256 * 1024
"""Bytes dropped while lingering before the connection is closed at once."""
READ_SIZE = 64 * 1024
"""Bytes read from a socket at a time (asyncio's own default is 256 KiB)."""
EVICTED_HOLD_S = 2.0
"""How long an evicted connection is held silent before it is closed (see ``_evict``)."""
FRESH_S = 1.0
"""A connection waiting for its headers this long is evicted before any waiting for a body."""
GRACE_JITTER = 0.5
"""Each body's rate grace is ``body_rate_grace_s`` times 1 to 1 + this (at random)."""

_REFUSAL = raw_error_response(ServerBusyError("Too many open connections; retry shortly."))
_REQUEST_TIMEOUT = raw_error_response(ClientTimeoutError("The request headers did not arrive in time."))
_HEADERS_TOO_LARGE = raw_error_response(
    HeadersTooLargeError("The request line and headers are larger than this server accepts.")
)
# h11 ends a request head at a blank line, with or without carriage returns
_HEAD_END = re.compile(rb"\n\r?\n")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the phases and bounds of the module docstring."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._hook: ConnectionHook | None = None
        self._pace: BodyPace | None = None
        self._held = 0
        """Bytes of the current unfinished body counted in ``limits.pending_body_bytes``."""
        self._dropped = 0
        self._body_cap = self.limits.max_body_bytes
        self._app = self.app
        self.app = self._app_once_body_ready  # what uvicorn starts for each request

    # ---- connection lifetime --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = ReadPauseClock(transport, self.loop.time)
        if hasattr(transport, "max_size"):
            # asyncio reads up to 256 KiB at a time, per connection: bytes in memory before
            # any budget can look at them (a thousand connections, a quarter of a GiB)
            transport.max_size = READ_SIZE
        open_now = len(self.connections) + len(self.limits.handshakes)
        if open_now > self.limits.max_connections and not self._make_room():
            self.limits.refused += 1
            self.limits.warn("connection_refused", open=len(self.connections))
            self.connections.discard(self)
            transport.write(_REFUSAL)
            transport.close()
            return
        self._enter("headers", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        self.limits.lingering.pop(self, None)
        self.limits.held_evicted.pop(self, None)
        super().connection_lost(exc)
        self._start_app(go=False)  # a request whose body never came is never started

    def data_received(self, data: bytes) -> None:
        if self._phase in ("linger", "evicted"):
            self._drop(len(data))
            return
        if self._head_too_large(data):
            self._answer_early(_HEADERS_TOO_LARGE, "the request headers are too large")
            return
        cycle = self.cycle
        before = len(cycle.body) if cycle is not None else 0
        super().data_received(data)
        self._follow_request_state()
        if self._phase == "body" and self.cycle is not None:
            # what this chunk added to the body buffer (the app takes the buffer only between
            # our calls, so the difference is exactly the body bytes just parsed)
            grown = len(self.cycle.body) - (before if self.cycle is cycle else 0)
            if grown > 0:
                self._count_body(grown)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request_state()

    def shutdown(self) -> None:
        """Server shutdown: idle connections close now (uvicorn); a response still running is
        dropped like a disconnect just before the grace ends, so its body is closed (engine
        job, FFmpeg, slot) by the normal path instead of uvicorn cancelling the task."""
        clock = self.limits.shutdown_clock
        clock.start()
        for held in list(self.limits.held_evicted):  # outside uvicorn's connection set
            held.abort()
        busy = self.cycle is not None and not self.cycle.response_complete
        self._leave()
        super().shutdown()
        if busy:
            self.loop.call_later(clock.abort_in(), self.abort)

    def abort(self) -> None:
        """Drop the connection now, unsent bytes included (a reader that stopped reading, an
        evicted connection); the request being served sees ``http.disconnect`` at once."""
        self._leave()
        self._tell_app_disconnected()
        if self.transport is not None:
            self.transport.abort()

    async def _app_once_body_ready(self, scope: Any, receive: Any, send: Any) -> None:
        hook = connection_hook(scope)
        if hook is not None and hook.body_ready is not None and not await hook.body_ready:
            return  # cut before its body came (the cycle is marked disconnected: uvicorn stays quiet)
        await self._app(scope, receive, send)

    # ---- phases -----------------------------------------------------------------------------

    def _follow_request_state(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._leave()
            return
        if self._phase in ("linger", "evicted"):
            return
        cycle = self.cycle
        if cycle is not None and cycle.scope.get("extensions", {}).get(CONNECTION_EXTENSION) is None:
            # The app task was created but has not run yet: it will see this in its scope.
            self._hook = ConnectionHook(abort=self.abort)
            cycle.scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = self._hook  # type: ignore[typeddict-unknown-key]
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if cycle is not None and cycle.response_complete:
                self._linger()  # answered before the body came: do not read the rest
                return
            if self._phase != "body":
                self._enter_body()
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                self._start_app()  # uvicorn holds 64 KiB, or the client waits for the app's go
            return
        elif state is h11.IDLE:
            # waiting for the next request's headers (uvicorn's shorter keep-alive timer also
            # runs until its first byte): the deadline counts from the previous response's end
            if self._phase != "headers":
                self._enter("headers", self.limits.header_timeout_s)
        else:
            self._leave()  # the request is whole: the app's phase, bounded by the response guard
            self._start_app()

    def _enter(self, phase: str, timeout_s: float) -> None:
        self._leave()
        self._phase = phase
        self._timer = self.loop.call_later(timeout_s, self._expired)
        pool = self.limits.waiting_headers if phase == "headers" else self.limits.waiting_bodies
        pool[self] = self.loop.time()  # newest last

    def _enter_body(self) -> None:
        if self._hook is not None and self._hook.body_ready is None:
            self._hook.body_ready = self.loop.create_future()
        self._enter("body", self.limits.body_timeout_s)
        cycle = self.cycle
        self._body_cap = self.limits.body_cap(cycle.scope["path"]) if cycle is not None else self.limits.max_body_bytes
        declared = _content_length(cycle.scope["headers"]) if cycle is not None else None
        if declared is not None and declared > self._body_cap:
            self._refuse_body_size()
            return
        now = self.loop.time()
        flow: ReadPauseClock = self.flow  # type: ignore[assignment]
        # up to half again as much grace, at random: a flood of half-sent bodies opened together
        # is then not cut (and does not reconnect) in one burst that stalls the event loop
        grace_s = self.limits.body_rate_grace_s * (1.0 + GRACE_JITTER * random.random())
        self._pace = BodyPace(
            timeout_s=self.limits.body_timeout_s,
            min_rate=self.limits.body_min_rate,
            grace_s=grace_s,
            started=now,
            paused_at_start=flow.paused_s(now),
        )
        self._reschedule(min(grace_s, self.limits.body_timeout_s))

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None
        self._pace = None
        if self._held:
            held, self._held = self._held, 0
            self.limits.release(held)
        self.limits.waiting_headers.pop(self, None)
        self.limits.waiting_bodies.pop(self, None)

    def _reschedule(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay_s, self._expired)

    # ---- the body ---------------------------------------------------------------------------

    def _refuse_body_size(self) -> None:
        error = PayloadTooLargeError(f"The request body is larger than this route accepts ({self._body_cap} bytes).")
        self._answer_early(raw_error_response(error), "the request body is too large", error)

    def _count_body(self, size: int) -> None:
        assert self._pace is not None
        self._pace.received += size
        self._held += size
        self.limits.hold(size)
        if self._pace.received > self._body_cap:  # a chunked body says its size only by growing
            self._refuse_body_size()
        elif self.limits.pending_body_bytes > self.limits.max_pending_body_bytes:
            self.limits.over_budget += 1
            self.limits.warn("request_body_over_budget", held=self._held)
            error = ServerBusyError(
                "The server holds as many unfinished request bodies as it takes; retry shortly."
            )
            self._answer_early(raw_error_response(error), "too many unfinished request bodies", error)

    def _check_body(self) -> None:
        pace = self._pace
        assert pace is not None
        now = self.loop.time()
        flow: ReadPauseClock = self.flow  # type: ignore[assignment]
        if self.cycle is not None and self.cycle.waiting_for_100_continue:
            # the client waits for our "100 Continue", which the app has not asked for yet
            pace.restart(now, flow.paused_s(now))
            self._reschedule(pace.grace_s)
            return
        why, next_look_s = pace.verdict(now, flow.paused_s(now), paused=flow.paused)
        if why is None:
            self._reschedule(next_look_s)
            return
        self.limits.timed_out += 1
        self.limits.warn("request_body_timeout", reason=why)
        error = ClientTimeoutError(f"The request body did not arrive in time: {why}.")
        self._answer_early(raw_error_response(error), why, error)

    def _expired(self) -> None:
        self._timer = None
        phase = self._phase
        if self.transport.is_closing():
            self._leave()
            return
        if phase == "body":
            self._check_body()
            return
        if phase == "linger":
            self._close()
            return
        self._leave()
        self.limits.timed_out += 1
        self.limits.warn("connection_read_timeout", phase=phase)
        if self.conn.our_state is h11.IDLE:
            self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()
        else:
            self.abort()

    # ---- answering before the request is whole ------------------------------------------------

    def _head_too_large(self, data: bytes) -> bool:
        if self.conn.their_state is not h11.IDLE:
            return False
        limit = self.limits.max_header_bytes
        buffered = self.conn.trailing_data[0]
        head = buffered + data[: limit + 4]
        end = _HEAD_END.search(head)
        return (end.end() if end else len(buffered) + len(data)) > limit

    def _answer_early(self, response: bytes, reason: str, error: GatewayError | None = None) -> None:
        """Answer now (if the app has not started its own response), stop reading, linger."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.abort()
            return
        if self._hook is not None and error is not None:
            self._hook.answered = Answer(error.status_code, reason)
        self._tell_app_disconnected()
        self.transport.write(response)
        self._linger()

    def _start_app(self, *, go: bool = True) -> None:
        hook = self._hook
        if hook is not None and hook.body_ready is not None and not hook.body_ready.done():
            hook.body_ready.set_result(go)

    def _tell_app_disconnected(self) -> None:
        """The app's request ends here: its ``receive`` returns ``http.disconnect`` and its
        sends are dropped (uvicorn does the same when the connection is lost); an app not
        started yet never is."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._start_app(go=False)

    def _linger(self) -> None:
        self._leave()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.body = bytearray()  # what the app will never read: free it now
        self._phase = "linger"
        self._unset_keepalive_if_required()
        self.flow.resume_reading()  # keep draining, so the client's writes do not block
        self.limits.lingering[self] = None
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after what is buffered: the client sees the answer end
        self._timer = self.loop.call_later(LINGER_S, self._expired)

    def _drop(self, size: int) -> None:
        self._dropped += size
        if self._dropped > LINGER_MAX_BYTES:
            self._close()

    def _close(self) -> None:
        self._leave()
        self.limits.lingering.pop(self, None)
        self.transport.close()

    def eof_received(self) -> bool | None:
        # the client is done sending; a lingering connection has nothing left to wait for
        if self._phase == "linger":
            self._close()
        return None

    # ---- the connection cap -----------------------------------------------------------------

    def _make_room(self) -> bool:
        return make_room(self.limits, self, self.loop.time(), open_now=len(self.connections))

    def _evict(self) -> None:
        """Give up this connection's place under the cap. A client that reconnects the moment
        it is dropped would take the place back at once, and evict the next (a chain that
        runs as fast as the CPU allows, and takes the event loop from everyone). So the
        connection is first held silent (not read, not answered, not counted under the cap)
        for :data:`EVICTED_HOLD_S`, while descriptors beyond the cap allow; then closed."""
        limits = self.limits
        if len(limits.held_evicted) >= limits.max_held_evicted:
            self.abort()
            return
        self._leave()
        self._tell_app_disconnected()
        self._phase = "evicted"
        self.connections.discard(self)  # out of the count the cap is checked against
        limits.held_evicted[self] = None
        self.transport.pause_reading()
        self._timer = self.loop.call_later(EVICTED_HOLD_S, self.abort)


def make_room(limits: ConnectionLimits, besides: Any, now: float, *, open_now: int) -> bool:
    """Close one connection that is not being served, other than ``besides``, in this order:
    one lingering; the oldest still waiting for its headers or its TLS handshake, if it has
    for :data:`FRESH_S` (an idle flood); the oldest waiting for its body (a flood of half-sent
    requests); the oldest waiting for its headers or handshake. A just-opened connection, such
    as a health check's, goes last: it is about to say what it wants."""
    victim = _oldest(limits.lingering, besides)
    if victim is None:
        idle, since = _oldest_idle(limits, besides)
        if idle is not None and now - since >= FRESH_S:
            victim = idle
        else:
            victim = _oldest(limits.waiting_bodies, besides) or idle
    if victim is None:
        return False
    limits.evicted += 1
    handshaking = victim in limits.handshakes
    limits.warn("connection_evicted", open=open_now, phase="handshake" if handshaking else victim._phase)
    if handshaking:
        victim.evict()  # a gateway.http.tls.TlsHandshake
    elif victim._phase == "linger":
        victim._close()
    else:
        victim._evict()
    return True


def _oldest(pool: dict[Any, Any], besides: Any) -> Any:
    for candidate in pool:
        if candidate is not besides:
            return candidate
    return None


def _oldest_idle(limits: ConnectionLimits, besides: Any) -> tuple[Any, float]:
    """The connection that has waited longest for its headers or its TLS handshake, and since
    when (None, 0.0 when there is none)."""
    found: tuple[Any, float] = (None, 0.0)
    for pool in (limits.waiting_headers, limits.handshakes):
        candidate = _oldest(pool, besides)
        if candidate is not None and (found[0] is None or pool[candidate] < found[1]):
            found = (candidate, pool[candidate])
    return found


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has already refused a malformed one
    return None


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to one server's limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with a :class:`ConnectionHook` (its ``abort``) in each
    socket's scope."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the handshake was accepted (else no app task is started)
            scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = ConnectionHook(abort=self.abort)

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
