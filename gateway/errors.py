"""Typed exceptions, each carrying its HTTP status and OpenAI error type.

Raise these anywhere; one handler (``gateway.http.errors``) renders every one of them as the
OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``.
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

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


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


class ConflictError(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


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


class WeightsUnavailableError(Exception):
    """Start-up cannot get model weights; the message tells the user what to do."""
