"""Bound how long a response may take and how long a client may leave a write pending.

A client that stops reading fills the socket; every ``send`` then waits for it, and a
streaming body waits with it, holding its admission slot, its engine job and its FFmpeg
process for as long as the client likes. The engine-side deadline cannot see this: it
bounds the body iterator's steps, not the sends between them.

This ASGI middleware wraps ``send`` for every HTTP request, whatever the route, format or
``stream_format``:

- one ``send`` may wait at most ``send_timeout_s`` (the client left a write pending);
- the whole request may take at most ``request_timeout_s`` plus :data:`APP_DEADLINE_MARGIN_S`
  (the app's own deadline goes first, so a reader that keeps up still gets the SSE
  ``timeout`` event; the margin only matters when the socket is blocked).

Past either, the response is abandoned exactly as if the client had hung up: the server's
connection is dropped (the ``gateway.connection`` scope extension of
:mod:`gateway.http.connection_guard`, which frees the socket without waiting for the unread
buffer), so the server reports ``http.disconnect``; Litestar's ``Stream`` then cancels and
closes the body iterator, which drops the engine job, kills FFmpeg and gives the admission
slot back. Under a server without that extension the disconnect is delivered through
``receive`` and the pending ``send`` never returns (the stream is cancelled around it). An
app that ignores the disconnect is cancelled :data:`CANCEL_GRACE_S` later. The request's log
line says ``outcome: timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.connection_hook import connection_hook
from gateway.observability.request_record import current_record
from gateway.settings import Settings

APP_DEADLINE_MARGIN_S = 1.0
CANCEL_GRACE_S = 1.0
DEADLINE_STATE = "gateway.deadline"
"""Scope state key: when (``time.monotonic()``) the request's own time limit ends."""

_DISCONNECT: Message = {"type": "http.disconnect"}  # type: ignore[assignment]


def response_guard(settings: Settings) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory, bound to the settings' limits."""
    send_timeout_s = settings.send_timeout_s
    total_s = settings.request_timeout_s + APP_DEADLINE_MARGIN_S

    def middleware_factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            scope.setdefault("state", {})[DEADLINE_STATE] = time.monotonic() + settings.request_timeout_s
            await _GuardedResponse(scope, receive, send, send_timeout_s).run(app, total_s)

        return middleware

    return middleware_factory


def request_deadline(scope: Scope, settings: Settings) -> float:
    """When the request's time limit ends (``time.monotonic()``): counted from when the
    guard saw the request, so work that must answer in time (a 504) goes before the guard
    drops the response; from now where no guard runs."""
    deadline = scope.get("state", {}).get(DEADLINE_STATE)
    return float(deadline) if deadline is not None else time.monotonic() + settings.request_timeout_s


class _GuardedResponse:
    __slots__ = (
        "_abort", "_expired", "_parked", "_receive", "_scope", "_send", "_send_timeout_s", "_cancel_scope", "_started",
        "reason",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, send_timeout_s: float) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._send_timeout_s = send_timeout_s
        hook = connection_hook(scope)
        self._abort: Callable[[], None] | None = hook.abort if hook is not None else None
        self._expired = asyncio.Event()
        self._parked = asyncio.Event()
        self._cancel_scope: asyncio.Timeout | None = None
        self._started = False
        self.reason: str | None = None

    async def run(self, app: ASGIApp, total_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(total_s, self._expire, "the request exceeded its time limit")
        receive = self._receive_after_parked if self._abort is not None else self._receive_or_expired
        try:
            async with asyncio.timeout(None) as cancel_scope:
                self._cancel_scope = cancel_scope
                await app(self._scope, receive, self._guarded_send)
        except TimeoutError:
            if self.reason is None:
                raise  # not ours
        except Exception:
            if not (self._started and self._abort is not None and current_record().outcome is not None):
                raise
            # The body broke after its status line, and the request's record already says why
            # (its one log line will): end the connection here, so the client sees a cut
            # response, instead of the server logging the same failure again as a traceback.
            self._abort()
        finally:
            deadline.cancel()

    def _expire(self, reason: str) -> None:
        if self._expired.is_set():
            return
        self.reason = reason
        self._expired.set()
        current_record().fail("timeout", reason)
        if self._abort is not None:
            self._abort()  # the server now reports a disconnect, as for a client that left
        if self._cancel_scope is not None:
            # an app that does not act on the disconnect is cancelled a little later
            self._cancel_scope.reschedule(asyncio.get_running_loop().time() + CANCEL_GRACE_S)

    async def _guarded_send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._started = True
        if not self._expired.is_set():
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await self._send(message)
                if not self._expired.is_set():
                    return
                # the deadline passed while this write waited: the server dropped it
            except TimeoutError:
                self._expire(f"the client left a response write pending for {self._send_timeout_s:g} s")
        # Never return: the app is cancelled while it waits here, with its body iterator
        # suspended between items, so the iterator's close runs outside the cancelled scope
        # and completes (closing it from inside a cancelled anyio scope would be cut short).
        self._parked.set()
        await asyncio.Event().wait()

    async def _receive_after_parked(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and self._expired.is_set():
            await self._wait_parked()  # our own abort: let the stream reach its next send first
        return message

    async def _receive_or_expired(self) -> Message:
        if self._expired.is_set():
            await self._wait_parked()
            return _DISCONNECT
        received = asyncio.ensure_future(self._receive())
        expired = asyncio.ensure_future(self._expired.wait())
        try:
            await asyncio.wait({received, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (received, expired):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if received.done() and not received.cancelled():
            return received.result()
        await self._wait_parked()
        return _DISCONNECT

    async def _wait_parked(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_GRACE_S):
                await self._parked.wait()
