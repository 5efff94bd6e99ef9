"""The error classes are the one table of status, OpenAI type and code."""

from __future__ import annotations

import pytest

from gateway.errors import (
    INTERNAL_ERROR_MESSAGE,
    EngineError,
    GatewayError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    as_gateway_error,
    error_for_status,
)
from gateway.http.errors import error_response


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [(404, NotFoundError, "not_found"), (405, MethodNotAllowedError, "method_not_allowed"),
     (413, PayloadTooLargeError, "payload_too_large")],
)
def test_framework_statuses_take_type_and_code_from_the_classes(status: int, cls: type, code: str) -> None:
    error = error_for_status(status, "said by the framework")
    assert type(error) is cls and error.code == code and error.message == "said by the framework"


def test_every_4xx_class_directly_under_gateway_error_is_found_by_its_status() -> None:
    for cls in GatewayError.__subclasses__():
        if 400 <= cls.status_code < 500 and cls.__module__ == "gateway.errors":
            assert type(error_for_status(cls.status_code, "m")) is cls


def test_a_status_without_a_class_is_still_an_envelope() -> None:
    error = error_for_status(418, "short and stout")
    assert (error.status_code, error.error_type, error.code) == (418, "invalid_request_error", None)


def test_foreign_exceptions_render_generic_and_ours_as_they_are() -> None:
    assert error_response(RuntimeError("secret detail")).error.message == INTERNAL_ERROR_MESSAGE
    ours = error_response(EngineError("engine said no", param="input"))
    assert (ours.error.type, ours.error.code, ours.error.param) == ("server_error", "engine_error", "input")
    assert as_gateway_error(KeyError("x")).status_code == 500
