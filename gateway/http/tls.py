"""TLS for ``serve --ssl-certfile/--ssl-keyfile``: https:// and wss:// on the one port, with the
connection guard's bounds kept for the handshake.

asyncio's own TLS (what uvicorn's ``ssl_certfile`` turns on) gives a handshake 60 s and hands
the connection to the HTTP protocol only once it is done: a client that opens a socket and
never finishes its handshake is invisible to :mod:`gateway.http.connection_guard` (no header
deadline, no place in the connection cap) for a minute. So uvicorn is given no certificate;
instead its protocol factory puts a :class:`TlsHandshake` (asyncio's own TLS protocol, the
class ``loop.create_server(ssl=...)`` uses) in front of each guarded h11 protocol, which:

- counts the connection toward ``max_connections`` from its accept (``limits.handshakes``),
  and at the cap makes room as a plain connection would
  (:func:`gateway.http.connection_guard.make_room`), or refuses this one; a handshaking
  connection is itself evicted like one waiting for its headers, held silent for
  ``EVICTED_HOLD_S`` first;
- gives the handshake ``header_timeout_s`` (asyncio aborts it past that), after which the
  header deadline runs as on plain HTTP;
- gives the TLS shutdown (waiting for the client's close_notify) the same bound;
- sends no TLS 1.3 session tickets (:func:`load_tls_context` says why).

Everything after the handshake (h11, the websocket upgrade, the response guard's abort) runs on
the TLS transport exactly as on a plain one.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from gateway.http.connection_guard import EVICTED_HOLD_S, GuardedH11Protocol, make_room
from gateway.http.connection_limits import ConnectionLimits
from gateway.settings import Settings, SettingsError


def load_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from ``ssl_certfile``/``ssl_keyfile``; None without them. A file
    that cannot be read or a key that does not match is a :class:`SettingsError` (one line at
    start, before the engine loads)."""
    if not settings.ssl_certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # h11 only: no h2 to negotiate
    # No TLS 1.3 session tickets. A threaded client that reads and writes one TLS session
    # from two threads (websockets' sync client, which the official elevenlabs SDK's realtime
    # helper uses) otherwise meets the tickets, sent just after the handshake, while it writes
    # its first request; OpenSSL forbids that concurrency and about 1 connection in 300-400
    # hung with its request lost (0 of 2,500 without tickets; docs/operations.md, "TLS"). The
    # cost: no session resumption, a full handshake per connection (Python clients resume none).
    context.num_tickets = 0
    try:
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"ssl_certfile/ssl_keyfile: cannot load the certificate and key "
            f"({settings.ssl_certfile}, {settings.ssl_keyfile or 'key in the certificate file'}): {exc}"
        ) from None
    return context


class TlsHandshake(sslproto.SSLProtocol):
    """asyncio's TLS protocol for one accepted connection, counted by the connection guard until
    its handshake ends (the guarded h11 protocol behind it counts it from then on)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: GuardedH11Protocol,
        context: ssl.SSLContext,
        limits: ConnectionLimits,
        connections: set[Any],
    ) -> None:
        super().__init__(
            loop,
            app_protocol,
            context,
            None,
            server_side=True,
            ssl_handshake_timeout=limits.header_timeout_s,
            ssl_shutdown_timeout=limits.header_timeout_s,
        )
        self._limits = limits
        self._connections = connections  # uvicorn's set of connections past their handshake
        self._pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # starts the handshake (and its timeout)
        limits = self._limits
        open_now = len(self._connections) + len(limits.handshakes)
        now = self._loop.time()
        if open_now >= limits.max_connections and not make_room(limits, self, now, open_now=open_now):
            limits.refused += 1
            limits.warn("connection_refused", open=open_now, tls="handshake")
            transport.abort()  # no HTTP can be spoken before the handshake: just close
            return
        self._pending = True
        limits.handshakes[self] = now

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        # Settled before the h11 protocol's connection_made (called from here) counts itself.
        self._settle()
        super()._on_handshake_complete(handshake_exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._settle()
        self._limits.held_evicted.pop(self, None)
        super().connection_lost(exc)

    def evict(self) -> None:
        """Give up this handshake's place under the cap (``make_room``): held silent (not read,
        outside the cap) for ``EVICTED_HOLD_S`` while descriptors allow, then closed, as the
        guarded protocol does with its evicted connections (a client that reconnects the moment
        it is dropped would otherwise evict the next at once, in a chain)."""
        self._settle()
        transport = self._transport
        limits = self._limits
        if transport is None or len(limits.held_evicted) >= limits.max_held_evicted:
            self.abort()
            return
        limits.held_evicted[self] = None
        transport.pause_reading()
        self._loop.call_later(EVICTED_HOLD_S, self.abort)

    def abort(self) -> None:
        """Drop the socket now (the end of an eviction's hold, or shutdown)."""
        self._settle()
        self._limits.held_evicted.pop(self, None)
        transport = self._transport
        if transport is not None:
            transport.abort()

    def _settle(self) -> None:
        if self._pending:
            self._pending = False
            self._limits.handshakes.pop(self, None)


def tls_protocol_factory(
    protocol_class: type[GuardedH11Protocol], context: ssl.SSLContext, limits: ConnectionLimits
) -> Callable[..., TlsHandshake]:
    """What uvicorn's ``http=`` takes: called per accepted connection with uvicorn's keyword
    arguments, it returns the TLS protocol wrapping a new guarded h11 protocol."""

    def create(*, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> TlsHandshake:
        loop = _loop or asyncio.get_event_loop()
        app = protocol_class(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        return TlsHandshake(loop, app, context, limits, server_state.connections)

    return create
