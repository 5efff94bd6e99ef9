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

from gateway.http.connection_hook import connection_hook
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.request_record import close_record, finish_request, open_record
from gateway.observability.timeline import Timeline, wanted

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


_DISCONNECTED = "client_disconnected"


def client_disconnected(scope: Scope | dict[str, Any]) -> bool:
    """Whether the client hung up before the response was complete (seen on ``receive``)."""
    return bool(scope.get("state", {}).get(_DISCONNECTED))


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
    """Bind the request id for logging and write one canonical line when the response ends
    (the line and the request metrics come from ``gateway.observability.request_record``)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        seen: dict[str, Any] = {"status": None, "first_byte": None, "completed": False, "disconnected": False}
        started = time.perf_counter()

        timeline = Timeline(origin=started) if _timeline_allowed(scope) and wanted(scope.get("headers")) else None

        async def send_and_record(message: Message) -> None:
            first = False
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                if seen["first_byte"] is None and message.get("body"):
                    seen["first_byte"] = time.perf_counter()
                    first = True
                if not message.get("more_body", False):
                    seen["completed"] = True
            await send(message)
            if first and timeline is not None:
                timeline.mark("first byte written")  # handed to the transport (the socket)

        async def receive_and_watch() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not seen["completed"]:
                seen["disconnected"] = True
                scope["state"][_DISCONNECTED] = True
            return message

        record, token = open_record(route=scope["path"])
        record.timeline = timeline
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await app(scope, receive_and_watch, send_and_record)
            finally:
                close_record(token)
                first_byte = seen["first_byte"]
                hook = connection_hook(scope)
                if hook is not None and hook.answered is not None:
                    # the connection answered for the app (a body too slow, or past the body
                    # budget): the app only saw a disconnect, the client got this status
                    record.outcome, record.error = None, hook.answered.reason
                    seen.update(status=hook.answered.status, completed=True, disconnected=False)
                finish_request(
                    record,
                    request_id=request_id,
                    method=scope["method"],
                    path=scope["path"],
                    status=seen["status"],
                    total_s=time.perf_counter() - started,
                    ttfb_s=None if first_byte is None else first_byte - started,
                    completed=seen["completed"],
                    disconnected=seen["disconnected"],
                    metrics=_metrics_of(scope),
                )

    return middleware


def _services_of(scope: Scope) -> Any:
    app = scope.get("litestar_app")
    return app.state.get("services") if app is not None else None


def _metrics_of(scope: Scope) -> GatewayMetrics | None:
    return getattr(_services_of(scope), "metrics", None)


def _timeline_allowed(scope: Scope) -> bool:
    """The server runs with ``request_timeline`` (else ``X-Timeline`` is ignored)."""
    settings = getattr(_services_of(scope), "settings", None)
    return bool(getattr(settings, "request_timeline", False))
