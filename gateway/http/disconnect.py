"""Stop a handler's work when its client hangs up before the response starts.

Litestar watches for a disconnect only while a streaming body is being sent. Before that, a
speech request may wait in the admission queue and then for the engine's first audio: a
client that gives up meanwhile would still hold its queue place and start engine work for
nobody. :func:`unless_disconnected` runs the preparation next to a watcher on the ASGI
``receive`` channel (the body has been read, so the only message left to come is
``http.disconnect``) and cancels the preparation when the client leaves; the cancellation
releases its admission slot and closes any engine work already started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from litestar.types import Receive

from gateway.errors import GatewayError
from gateway.observability.request_record import current_record

T = TypeVar("T")


class ClientDisconnectedError(GatewayError):
    """The client closed the connection before the response started (nginx's 499)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_disconnected"


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``await work``, unless the client disconnects first (then ClientDisconnectedError)."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watcher.done():  # we are being cancelled ourselves
            task.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    current_record().fail("cancelled", "the client disconnected before the response started")
    raise ClientDisconnectedError("The client disconnected before the response started.")
