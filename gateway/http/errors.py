"""The one exception handler: every error leaves the gateway as the OpenAI envelope.

``{"error": {"message", "type", "param", "code"}}`` for our typed errors, for Litestar's own
routing and protocol errors (404, 405, 413, its validation errors: the status picks the class
in ``gateway.errors`` that supplies type and code) and for anything unexpected (500, logged
with its traceback). Litestar's 422 never reaches a client: a
validation failure is a client error and the OpenAI contract says 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec

from gateway.errors import GatewayError, InvalidRequestError, as_gateway_error, error_for_status
from gateway.http.protocol import ErrorDetail, ErrorResponse
from gateway.http.disconnect import ClientDisconnectedError
from gateway.http.request_context import client_disconnected
from gateway.observability.request_record import current_record

_MESSAGES: dict[int, str] = {
    404: "Unknown URL: {method} {path}. See GET /v1/models and the OpenAPI document at /schema/openapi.json.",
    405: "Method {method} is not allowed for {path}.",
    413: "The request body is too large.",
}


BEARER_SECURITY: list[dict[str, list[str]]] = [{"BearerAuth": []}]
"""OpenAPI security requirement of every /v1 route (enforced only when keys are configured)."""


def v1_error_responses(descriptions: dict[int, str]) -> dict[int, ResponseSpec]:
    """``error_responses`` plus the 401 every /v1 route can answer when API keys are set."""
    return error_responses(
        {401: "Missing or wrong API key (`code`: `invalid_api_key`); only when keys are configured", **descriptions}
    )


def error_responses(descriptions: dict[int, str]) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a handler's error statuses, all documented as the envelope (this
    also replaces Litestar's default 400 schema, which we never send)."""
    return {
        status: ResponseSpec(data_container=ErrorResponse, description=text, generate_examples=False)
        for status, text in descriptions.items()
    }


def error_response(exc: BaseException) -> ErrorResponse:
    """The OpenAI envelope for ``exc`` (our typed errors as they are, anything else generic);
    the HTTP error responses and the speech stream's SSE ``error`` event both use it."""
    error = as_gateway_error(exc)
    return ErrorResponse(error=ErrorDetail(message=error.message, type=error.error_type, param=error.param, code=error.code))


Renderer = Callable[[GatewayError, int, "dict[str, str] | None"], Response[Any]]
"""How an error leaves: our typed error, the status to send, extra headers."""


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Render any exception raised while handling a request (registered for ``Exception``)."""
    return handle_with(request, exc, _render)


def exception_handler(render: Renderer) -> Callable[[Request[Any, Any, Any], Exception], Response[Any]]:
    """The same handling as :func:`handle_exception` with another error shape (a router of
    another API face registers it: the ElevenLabs routes' ``{"detail": ...}``)."""

    def handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        return handle_with(request, exc, render)

    return handler


def handle_with(request: Request[Any, Any, Any], exc: Exception, _render: Renderer) -> Response[Any]:
    """Classify ``exc`` (logging what is the server's fault) and render it with ``_render``."""
    log = structlog.get_logger("gateway.http")
    if isinstance(exc, UnicodeDecodeError):
        # bytes a client sent that are not UTF-8 (e.g. a multipart text field Litestar decodes)
        error = InvalidRequestError("A text field of the request is not valid UTF-8.", code="invalid_encoding")
        return _render(error, error.status_code)
    if isinstance(exc, HTTPException) and exc.status_code >= 500 and client_disconnected(request.scope):
        # e.g. a body shorter than its Content-Length: Litestar's read fails with a 500, but
        # the client left; nobody will read this answer, and it is not the server's fault
        current_record().fail("cancelled", "the client disconnected before the request was read")
        return _render(ClientDisconnectedError(str(exc.detail)), 499)
    if isinstance(exc, HTTPException) and not isinstance(exc, GatewayError):
        status = 400 if exc.status_code == 422 else exc.status_code
        if status >= 500:
            log.error("request_failed", error=exc.detail, exc_info=exc)
            return _render(as_gateway_error(exc), status)
        template = _MESSAGES.get(status)
        message = template.format(method=request.method, path=request.url.path) if template else str(exc.detail or "")
        param, reason = _validation_problem(exc)
        if reason:
            message = f"{message}: {reason}"
        error = error_for_status(status, message)
        error.param = param
        return _render(error, status, dict(exc.headers) if exc.headers else None)
    if isinstance(exc, GatewayError):
        expected = exc.status_code in (503, 504)  # engine loading, queue or time limit: not faults
        if expected and exc.__cause__ is None:
            # the request's one log line (a warning for these statuses) carries the reason:
            # a load balancer polling /ready while the engine loads writes one line per poll
            record = current_record()
            record.error = record.error or exc.message
        elif exc.status_code >= 500:
            emit = log.warning if expected else log.error
            emit("request_failed", error=exc.message, code=exc.code, exc_info=exc.__cause__ is not None)
        return _render(exc, exc.status_code, exc.headers or None)
    log.exception("unhandled_error", error=repr(exc))
    return _render(as_gateway_error(exc), 500)


def _render(error: GatewayError, status: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=error_response(error), status_code=status, headers=headers)


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_BODY_KEY = "data"
"""What Litestar calls the whole request body in a validation error: not a field a client sent."""


def _validation_problem(exc: HTTPException) -> tuple[str | None, str | None]:
    """The field a Litestar validation error is about and why (its ``extra`` carries ``key``
    and msgspec's ``message``); a missing field is named, not reported as the whole body."""
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        extra = extra[0]
    if not isinstance(extra, dict):
        return None, None
    key = extra.get("key")
    reason = extra.get("message")
    if isinstance(reason, str) and (missing := _MISSING_FIELD.search(reason)):
        return missing.group(1), f"missing required field '{missing.group(1)}'"
    param = str(key) if key is not None and key != _BODY_KEY else None
    return param, str(reason) if reason else None
