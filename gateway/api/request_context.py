"""Per-request context: the request id (echoed as ``x-request-id``) and one log line per request.

The id is the client's ``x-request-id`` when it sent a sane one, else a fresh one. It is bound
into structlog's context variables for everything logged while the request runs, handed to
the engine as the job id, and put on every response, errors and unknown routes included
(the header is added in a ``before_send`` hook, which sees every response).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_of(scope: Scope | dict[str, Any]) -> str:
    """The request's id, decided once per request and kept in the scope state."""
    state = scope.setdefault("state", {})
    request_id = state.get("request_id")
    if request_id is None:
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        state["request_id"] = request_id
    return str(request_id)


def _client_request_id(scope: Scope | dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1").strip()
            return candidate if _SANE_ID.fullmatch(candidate) else None
    return None


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every HTTP response carries the request id."""
    if message["type"] == "http.response.start" and scope["type"] == "http":
        headers = MutableScopeHeaders.from_message(message)
        headers[REQUEST_ID_HEADER] = request_id_of(scope)


def request_context_middleware(app: ASGIApp) -> ASGIApp:
    """Bind the request id for logging and write one canonical line when the response ends."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        status: dict[str, int] = {}
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        log = structlog.get_logger("gateway.access")
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await app(scope, receive, send_and_record)
            finally:
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status.get("code"),
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )

    return middleware
