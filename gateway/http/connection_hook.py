"""What the connection serving a request tells the app, through the request scope.

The guarded protocol (:mod:`gateway.http.connection_guard`) puts one :class:`ConnectionHook`
in ``scope["extensions"]["gateway.connection"]`` before the app runs. The response guard uses
``abort`` to drop a socket whose client stopped reading; the request log reads ``answered``
to report what the protocol itself sent when it cut a request short (a body that came too
slowly, or past the server's budget for unfinished bodies), instead of a bare disconnect.
Under another server (tests in process, plain uvicorn) there is no hook and both fall back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONNECTION_EXTENSION = "gateway.connection"


@dataclass(frozen=True, slots=True)
class Answer:
    """A response the protocol sent on the app's behalf."""

    status: int
    reason: str


@dataclass(slots=True)
class ConnectionHook:
    abort: Callable[[], None]
    """Drop the connection now, unsent bytes included; the app then sees ``http.disconnect``."""
    answered: Answer | None = None
    """Set when the protocol answered the request itself (the app sees a disconnect)."""
    body_ready: asyncio.Future[bool] | None = None
    """While set and pending, the app has not been started: the protocol resolves it True when
    the body is in (or the app must start taking it), False when the request was cut first."""


def connection_hook(scope: Any) -> ConnectionHook | None:
    """The hook of the connection serving ``scope``, if the server provides one."""
    hook = scope.get("extensions", {}).get(CONNECTION_EXTENSION)
    return hook if isinstance(hook, ConnectionHook) else None
