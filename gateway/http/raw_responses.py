"""Whole HTTP responses as bytes, for the connection guard to write below the app.

The protocol answers some requests itself (headers too large, a body too slow or past the
body budget) while the app has not answered yet, or before there is an app request at all.
Those answers are the same OpenAI envelope as every other error, with ``connection: close``
(the connection ends after them).
"""

from __future__ import annotations

import http

import msgspec

from gateway.errors import GatewayError
from gateway.http.errors import error_response


def raw_error_response(error: GatewayError) -> bytes:
    """``error`` as a complete HTTP/1.1 response: status line, headers, JSON envelope."""
    body = msgspec.json.encode(error_response(error))
    status = error.status_code
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    headers = {
        "content-type": "application/json",
        "connection": "close",
        "content-length": str(len(body)),
        **{name.lower(): value for name, value in error.headers.items()},
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body
