"""Every error of the ElevenLabs face, rendered once, from the same typed exceptions
(``gateway.errors``) as the OpenAI envelope.

- REST: ``{"detail": {"status": <code>, "message": ..., "param"?: ...}}`` with the HTTP status the
  error carries (400, 401, 404, 413, 429, 503, 504, ...); the router registers
  :data:`handle_exception` (the same classification and logging as the OpenAI routes).
- WebSocket: ``{"message", "error": <code>, "code": <close code>}`` (plus ``contextId`` on
  ``multi-stream-input``), then a close with that code: a client error (a malformed message,
  a bound exceeded, a wrong key, an unknown voice) is 1008 "policy violation"; overload
  (429/503) and time limits are 1013 "try again later"; only the server's own failures
  (engine, encoder) are 1011.
"""

from __future__ import annotations

from typing import Any

from litestar import Response

from gateway.errors import GatewayError, as_gateway_error
from gateway.http.elevenlabs.protocol import ElevenLabsError, ElevenLabsErrorDetail, WsError
from gateway.http.errors import exception_handler

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_TRY_AGAIN = 1013


def error_body(exc: BaseException) -> ElevenLabsError:
    error = as_gateway_error(exc)
    return ElevenLabsError(detail=ElevenLabsErrorDetail(status=error.code or error.error_type, message=error.message, param=error.param))


def render(error: GatewayError, status: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=error_body(error), status_code=status, headers=headers)


handle_exception = exception_handler(render)
"""The ElevenLabs router's exception handler."""


def close_code_for(exc: BaseException) -> int:
    status = as_gateway_error(exc).status_code
    if status in (429, 503, 504):
        return CLOSE_TRY_AGAIN
    if 400 <= status < 500:
        return CLOSE_POLICY
    return CLOSE_SERVER_ERROR


def ws_error(exc: BaseException, context_id: str | None = None) -> WsError:
    """The error message for ``exc`` (its close code included)."""
    error = as_gateway_error(exc)
    return WsError(
        message=error.message, error=error.code or error.error_type, code=close_code_for(error), context_id=context_id
    )
