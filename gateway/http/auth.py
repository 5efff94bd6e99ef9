"""API keys: ``Authorization: Bearer <key>`` (or ElevenLabs' ``xi-api-key: <key>``) on every
/v1 route when keys are configured.

Keys come from ``settings.all_api_keys()`` (the ``api_keys`` setting plus ``api_keys_file``),
read once when the app is built. A presented key is compared with every configured key in
constant time (``hmac.compare_digest``, no early exit), so response timing says nothing about
how close a guess was or which key matched. Keys are never logged: only the fact that a
request was refused.

With no keys configured every request is accepted, with or without a bearer (the OpenAI SDK
always sends one, so "any bearer" must work), and start-up logs a warning saying so.
``/health`` and ``/ready`` are always open; ``/metrics`` needs a key only when
``settings.metrics_require_auth`` is set.

WebSockets (the ElevenLabs face's ``stream-input``): a key in the handshake (either header,
or the ``authorization`` / ``xi_api_key`` query parameter, for browsers that cannot set
headers) is checked here, and a wrong one refused before the upgrade (401). A handshake
without any key passes, marked unauthenticated (:func:`is_authenticated`): ElevenLabs lets
the first message carry ``xi_api_key``, and the socket handler checks it with the same
:class:`KeyChecker` (``app.state``, :data:`KEY_CHECKER_STATE`) before doing anything else.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from urllib.parse import parse_qs

import msgspec
import structlog
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.errors import AuthenticationError
from gateway.http.elevenlabs.errors import error_body as elevenlabs_error_body
from gateway.http.elevenlabs.paths import is_elevenlabs_path
from gateway.http.errors import error_response
from gateway.settings import Settings, SettingsError

API_PREFIX = "/v1"
METRICS_PATH = "/metrics"
KEY_CHECKER_STATE = "api_key_checker"
"""``app.state`` key of the app's :class:`KeyChecker` (the WebSocket handler's first-message check)."""
AUTHENTICATED = "gateway.authenticated"
"""Scope state flag: this request's key was checked here and accepted."""

_BEARER = b"bearer "
_XI_API_KEY = b"xi-api-key"


class KeyChecker:
    """Holds the accepted keys (as bytes) and answers "is this presented key one of them"."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys: tuple[bytes, ...] = tuple(sorted(k.encode("utf-8") for k in keys if k))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def count(self) -> int:
        return len(self._keys)

    def accepts(self, presented: bytes) -> bool:
        # compare against every key, whatever matched earlier: the time taken depends only on
        # the number and length of configured keys, never on which one (if any) matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer`` header, raw bytes, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            if value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER):].strip()
            return None
    return None


def presented_key(scope: Scope) -> bytes | None:
    """The key a request presents: ``Authorization: Bearer``, else ``xi-api-key``, else (a
    WebSocket handshake only) the ``authorization`` or ``xi_api_key`` query parameter."""
    headers = scope["headers"]
    token = bearer_token(headers)
    if token is not None:
        return token
    for name, value in headers:
        if name.lower() == _XI_API_KEY:
            return value.strip()
    if scope["type"] == "websocket":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        for value in query.get("authorization", ()):
            raw = value.encode("latin-1")
            return raw[len(_BEARER):].strip() if raw[: len(_BEARER)].lower() == _BEARER else raw.strip()
        for value in query.get("xi_api_key", ()):
            return value.encode("latin-1").strip()
    return None


def is_authenticated(scope: Scope) -> bool:
    """Whether the middleware checked and accepted this request's key (False when keys are
    not enforced, or a WebSocket presented none in its handshake)."""
    return bool(scope.get("state", {}).get(AUTHENTICATED))


def needs_key(path: str, *, metrics_require_auth: bool) -> bool:
    if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        return True
    return metrics_require_auth and path == METRICS_PATH


class APIKeyMiddleware(ASGIMiddleware):
    """Refuses protected routes without a configured key, before any handler work."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self, checker: KeyChecker, *, metrics_require_auth: bool) -> None:
        self.checker = checker
        self.metrics_require_auth = metrics_require_auth

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        # CORS preflights never carry credentials; they reveal nothing and must pass.
        if (
            self.checker.enabled
            and scope.get("method") != "OPTIONS"
            and any(
                # the route Litestar matched as well as the raw path: however a path is
                # spelled, a request that reaches a /v1 handler is checked
                needs_key(path, metrics_require_auth=self.metrics_require_auth)
                for path in (scope["path"], scope.get("path_template") or "")
            )
        ):
            token = presented_key(scope)
            websocket = scope["type"] == "websocket"
            if token is None and not websocket:
                await _refuse(scope, send, AuthenticationError(MISSING_KEY_MESSAGE))
                return
            if token is not None and not self.checker.accepts(token):
                await _refuse(scope, send, AuthenticationError("Incorrect API key provided."))
                return
            if token is not None:
                scope.setdefault("state", {})[AUTHENTICATED] = True
        await next_app(scope, receive, send)


MISSING_KEY_MESSAGE = "Missing API key: send it as 'Authorization: Bearer <key>' or 'xi-api-key: <key>'."


async def _refuse(scope: Scope, send: Send, exc: AuthenticationError) -> None:
    """Answer 401 here rather than raise: the request's own middleware (request id, access
    log line, metrics) then sees an ordinary response instead of an exception. The body is
    the error shape of the face the path belongs to. A WebSocket handshake is refused with
    the same 401 where the server can send a response to it, else with a close (403)."""
    path = scope.get("path_template") or scope["path"]
    shaped = elevenlabs_error_body(exc) if is_elevenlabs_path(scope["path"]) or is_elevenlabs_path(path) else error_response(exc)
    body = msgspec.json.encode(shaped)
    prefix = "http"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        prefix = "websocket.http"
    await send(
        {
            "type": f"{prefix}.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": f"{prefix}.response.body", "body": body, "more_body": False})


def auth_middleware(settings: Settings) -> APIKeyMiddleware:
    """The middleware for ``create_app``: reads the key file once, here."""
    try:
        keys = settings.all_api_keys()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"api_keys_file: cannot read {settings.api_keys_file!r}: {exc}") from None
    return APIKeyMiddleware(KeyChecker(keys), metrics_require_auth=settings.metrics_require_auth)


def log_auth_mode(middleware: APIKeyMiddleware, logger: structlog.typing.FilteringBoundLogger | None = None) -> None:
    """Say at start-up whether keys are enforced (never which keys)."""
    log = logger or structlog.get_logger("gateway.http.auth")
    if middleware.checker.enabled:
        log.info("api_keys_enforced", key_count=middleware.checker.count)
    else:
        log.warning(
            "api_keys_disabled",
            detail="no API keys configured: any request is accepted; set CHATTERBOX_API_KEYS or --api-keys-file",
        )
