"""Typed exceptions, each carrying its HTTP status, OpenAI error type and code.

These classes are the one source of what an error looks like on the wire: raise them
anywhere; ``gateway.http.errors`` renders every one of them (and any error Litestar raises
itself, through :func:`error_for_status`) as the OpenAI envelope
``{"error": {"message", "type", "param", "code"}}``, and the speech stream's SSE ``error``
event carries the same object.
"""

from __future__ import annotations


class GatewayError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."
"""What a client is told of a failure that is not one of ours (details go to the log only)."""


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class VoiceNotFoundError(NotFoundError):
    code = "voice_not_found"


class MethodNotAllowedError(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class ForbiddenError(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class ClientTimeoutError(GatewayError):
    """The client took too long to send its request."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLargeError(GatewayError):
    """The request line and headers are larger than the server takes."""

    status_code = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class ConflictError(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class UpgradeRequiredError(GatewayError):
    """A WebSocket route asked for with plain HTTP."""

    status_code = 426
    error_type = "invalid_request_error"
    code = "upgrade_required"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    code = "unsupported_media_type"


class OverloadedError(GatewayError):
    """Admission refused: too much work in flight. Always carries Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "server_overloaded"
    limit = "server"
    """Which admission limit refused it (``client``/``key`` for a fair-share refusal)."""

    def __init__(self, message: str, *, retry_after_s: int = 1, **kw: object) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)  # type: ignore[arg-type]


class EngineUnavailableError(GatewayError):
    """The engine is loading or has failed. Always carries Retry-After."""

    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, **kw: object) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)  # type: ignore[arg-type]


class RequestTimeoutError(GatewayError):
    status_code = 504
    error_type = "server_error"
    code = "timeout"


class ServerBusyError(GatewayError):
    """A shared bound of the server is full (e.g. the bytes of unfinished request bodies); the
    client did nothing wrong and may retry. Always carries Retry-After."""

    status_code = 503
    error_type = "server_error"
    code = "server_busy"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kw: object) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)  # type: ignore[arg-type]


class EngineError(GatewayError):
    """The engine failed while working on a request (not the client's fault)."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class EncoderError(GatewayError):
    """FFmpeg failed while encoding a request's audio."""

    status_code = 500
    error_type = "server_error"
    code = "encoder_error"


def as_gateway_error(exc: BaseException) -> GatewayError:
    """``exc`` itself if it is one of ours, else a generic server error (500)."""
    return exc if isinstance(exc, GatewayError) else GatewayError(INTERNAL_ERROR_MESSAGE)


def error_for_status(status: int, message: str) -> GatewayError:
    """Our error for a status raised by the framework itself (a 404 route, a 405, a 413), taken
    from the first class (base classes first) that declares that status; 4xx only."""
    cls = _CLASS_FOR_STATUS.get(status)
    if cls is None:
        error = GatewayError(message)
        error.status_code, error.error_type, error.code = status, "invalid_request_error", None
        return error
    return cls(message)


def _classes_by_status() -> dict[int, type[GatewayError]]:
    found: dict[int, type[GatewayError]] = {}
    pending = list(GatewayError.__subclasses__())
    while pending:
        cls = pending.pop(0)
        if 400 <= cls.status_code < 500:
            found.setdefault(cls.status_code, cls)
        pending.extend(cls.__subclasses__())
    return found


class WeightsUnavailableError(Exception):
    """Start-up cannot get model weights; the message tells the user what to do."""


_CLASS_FOR_STATUS = _classes_by_status()
