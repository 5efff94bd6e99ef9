"""``/v1/text-to-speech/{voice_id}/stream-input`` and ``.../multi-stream-input``: ElevenLabs'
input-streaming WebSockets.

One :class:`TtsSocket` per connection reads the client's messages in a single loop; each
*context* (the one of ``stream-input``, any number up to ``elevenlabs_max_contexts`` on
``multi-stream-input``, named by ``context_id``) buffers its text (:class:`TextStream`), hands
every chunk to its :class:`Utterance` the moment it is cut, and sends the audio back from a task
of its own as the engine makes it. So the loop keeps reading while audio is made: a barge-in
is acted on at once.

Messages (client -> server):

- text: ``{"text": "...", "flush"?, "try_trigger_generation"?, "voice_settings"?,
  "generation_config"?: {"chunk_length_schedule"}, "xi_api_key"?, "context_id"?}``; settings
  apply until the context's first chunk is cut;
- ``stream-input``: ``{"text": ""}`` ends the input: what is buffered is spoken, then
  ``{"isFinal": true}`` and a normal close (1000);
- ``multi-stream-input``: ``{"text": "", "context_id"}`` is a keepalive; ``{"context_id",
  "flush": true}`` speaks what is buffered; ``{"context_id", "close_context": true}`` ends a
  context (below); ``{"close_socket": true}`` ends every context as a graceful close, then the
  socket.

``close_context`` is barge-in: the context's engine job is cancelled at once, its admission slot
released, its buffered text dropped, and ``isFinal`` follows. One case is a graceful end instead:
the close that comes right after a flush that carried no new text (the end of a turn as Pipecat,
LiveKit and the SDK helpers send it: "flush, then close"), which lets the flushed text be spoken
to its end before ``isFinal``; a second ``close_context`` for it cancels at once.

Server -> client: ``{"audio": base64, "isFinal": null, "alignment", "normalizedAlignment"}``
(``contextId`` added on multi-stream), ``{"isFinal": true}`` when a context ends, and
``{"message", "error", "code"}`` before an error close (``errors.py``). Each text chunk's timings
ride on the first audio message after the chunk's audio is complete (``timings.py``).

Keys and fair shares: the socket's caller (``gateway.http.caller``) is its handshake's key, or,
when the handshake carried none, the first message's ``xi_api_key``, checked before anything
else. The voice is looked up among that key's voices (another key's voice is unknown: error,
1008), and every chunk's admission slot counts in the caller's client and key shares: a
refusal is the context's error naming the limit (``server_overloaded``,
``client_concurrency_limit``, ``key_concurrency_limit``; 1013 where it closes the socket).

Bounds: the WebSocket layer refuses messages over ``elevenlabs_max_message_bytes`` (1009) and
answers pings; here: sockets in all (``elevenlabs_max_sockets``, 503 before the upgrade),
contexts per socket, text buffered per context, inactivity (no message received and no audio
sent for ``inactivity_timeout``), the socket's lifetime, and each send (``send_timeout_s``: a
client that stops reading is dropped). Every malformed message or exceeded bound gets an error
message and a 1008 close; the server itself goes on. One log line per context and one per
socket; metrics in ``chatterbox_websocket*``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs

import msgspec
import structlog
from litestar import WebSocket, get, websocket
from litestar.openapi.datastructures import ResponseSpec
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath

from gateway.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    UpgradeRequiredError,
    VoiceNotFoundError,
    as_gateway_error,
)
from gateway.http.elevenlabs.docs import ELEVENLABS_SECURITY, elevenlabs_error_responses
from gateway.http.caller import Caller, caller_of, remember_caller
from gateway.http.connection_hook import connection_hook
from gateway.http.elevenlabs.controls import speech_request
from gateway.http.elevenlabs.errors import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    error_body,
    ws_error,
)
from gateway.http.elevenlabs.face import ElevenLabsFace, face_of
from gateway.http.elevenlabs.output_formats import OutputFormat, parse_output_format
from gateway.http.elevenlabs.protocol import (
    ClientMessage,
    VoiceSettings,
    WsAudio,
    WsContextAudio,
    WsContextFinal,
    WsFinal,
    decode_client_message,
)
from gateway.http.elevenlabs.timings import ws_alignment
from gateway.http.protocol import MAX_SEED
from gateway.http.request_context import request_id_of
from gateway.models.families import Family
from gateway.speech.text_stream import DEFAULT_SCHEDULE, TextStream
from gateway.speech.utterance import AudioBytes, ChunkTimings, Utterance, plan_speech

STREAM_INPUT = "stream-input"
MULTI_STREAM_INPUT = "multi-stream-input"
DEFAULT_CONTEXT = "default"
"""The context of a multi-stream message that names none."""

_ENCODER = msgspec.json.Encoder()
T = TypeVar("T", int, float)
_log = structlog.get_logger("gateway.elevenlabs")


STREAM_INPUT_PATH = f"/v1/text-to-speech/{{voice_id:str}}/{STREAM_INPUT}"
MULTI_STREAM_INPUT_PATH = f"/v1/text-to-speech/{{voice_id:str}}/{MULTI_STREAM_INPUT}"


@websocket(STREAM_INPUT_PATH)
async def stream_input(socket: WebSocket[Any, Any, Any], voice_id: FromPath[str]) -> None:
    """One utterance streamed in as text, out as audio (ElevenLabs' stream-input)."""
    await TtsSocket(socket, voice_id, multi=False).run()


@websocket(MULTI_STREAM_INPUT_PATH)
async def multi_stream_input(socket: WebSocket[Any, Any, Any], voice_id: FromPath[str]) -> None:
    """Several utterances (contexts) on one socket (ElevenLabs' multi-stream-input)."""
    await TtsSocket(socket, voice_id, multi=True).run()


# OpenAPI has no WebSockets: these GET routes document the two sockets (their handshake is a
# GET with "Upgrade: websocket"); asked for without the upgrade they answer 426.
_QUERY_DOC = (
    "Query: `model_id`, `output_format` (as the REST routes), `language_code`, `auto_mode` "
    "(true: cut at every sentence end), `inactivity_timeout` (seconds, default 20), `sync_alignment`, "
    "`seed`; others accepted and ignored. Key: the `xi-api-key` or bearer header, or `xi_api_key` in "
    "the first message. Server messages: `{\"audio\": base64, \"isFinal\": null, \"alignment\", "
    "\"normalizedAlignment\"}` (alignment: `chars`, `charStartTimesMs`, `charDurationsMs`, ms from the "
    "start of the text chunk's audio), `{\"isFinal\": true}`, errors `{\"message\", \"error\", "
    "\"code\"}` before a close (1008 client error, 1013 overload, 1011 server fault). See docs/voice-agents.md."
)
_UPGRADE_RESPONSES = {
    **elevenlabs_error_responses({426: "Not a WebSocket handshake (`status`: `upgrade_required`)"}),
    101: ResponseSpec(data_container=None, description="Switching Protocols: the WebSocket is open."),
}


@get(
    STREAM_INPUT_PATH,
    tags=["elevenlabs"],
    summary="stream-input WebSocket (ElevenLabs)",
    description="Text in as the LLM writes it, audio out as it is made, one utterance. Client messages: "
    '`{"text": " ", "voice_settings"?, "generation_config"?: {"chunk_length_schedule"}}` first, then '
    '`{"text": "...", "flush"?, "try_trigger_generation"?}`, then `{"text": ""}` to end (the server '
    "sends the rest, `isFinal`, and closes with 1000). " + _QUERY_DOC,
    responses=_UPGRADE_RESPONSES,
    security=ELEVENLABS_SECURITY,
    status_code=101,
    sync_to_thread=False,
)
def stream_input_upgrade(voice_id: FromPath[str]) -> None:
    raise UpgradeRequiredError("This is a WebSocket: connect with ws:// or wss://.")


@get(
    MULTI_STREAM_INPUT_PATH,
    tags=["elevenlabs"],
    summary="multi-stream-input WebSocket (ElevenLabs)",
    description="Several utterances (contexts) on one socket; every message names its `context_id` "
    '(replies carry `contextId`). `{"text": "", "context_id"}` is a keepalive; `{"context_id", "flush": '
    'true}` speaks what is buffered; `{"context_id", "close_context": true}` stops the context at once '
    "(barge-in: its engine job is cancelled), except right after a flush without new text, where it "
    'ends the turn gracefully; `{"close_socket": true}` ends every context, then the socket. ' + _QUERY_DOC,
    responses=_UPGRADE_RESPONSES,
    security=ELEVENLABS_SECURITY,
    status_code=101,
    sync_to_thread=False,
)
def multi_stream_input_upgrade(voice_id: FromPath[str]) -> None:
    raise UpgradeRequiredError("This is a WebSocket: connect with ws:// or wss://.")


class ClientGone(Exception):
    """The socket is closed (by the client, a failed send, or us): nothing more can be sent."""


class SocketClosing(Exception):
    """A bound or protocol error closes the socket (after its error message)."""

    def __init__(self, error: GatewayError, close_code: int | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.close_code = close_code


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """The query parameters, checked once when the socket opens."""

    family: Family
    output: OutputFormat
    language: str | None
    inactivity_timeout_s: float
    auto_mode: bool
    seed: int | None

    @staticmethod
    def parse(query: dict[str, list[str]], face: ElevenLabsFace) -> SocketOptions:
        settings = face.services.settings

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        language = one("language_code")
        inactivity = settings.elevenlabs_inactivity_timeout_s
        if (asked := _number(one("inactivity_timeout"), "inactivity_timeout", float, low=1e-3)) is not None:
            inactivity = min(asked, settings.elevenlabs_max_inactivity_timeout_s)
        seed = _number(one("seed"), "seed", int, low=0, high=MAX_SEED)
        return SocketOptions(
            family=face.models.resolve(one("model_id"), language),
            output=parse_output_format(one("output_format")),
            language=language,
            inactivity_timeout_s=inactivity,
            auto_mode=_flag(one("auto_mode"), "auto_mode"),
            seed=seed,
        )


def _number(value: str | None, name: str, kind: type[T], *, low: T, high: T | None = None) -> T | None:
    """A numeric query parameter in ``[low, high]``, or None when absent; 400 naming it."""
    if value is None:
        return None
    try:
        number = kind(value)  # type: ignore[call-arg]
    except ValueError:
        raise InvalidRequestError(f"{name} must be a number, got {value[:20]!r}.", param=name) from None
    if not low <= number or (high is not None and number > high):  # type: ignore[operator]
        raise InvalidRequestError(f"{name} must be at least {low}" + (f" and at most {high}." if high is not None else "."), param=name)
    return number


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no", ""):
        return False
    raise InvalidRequestError(f"{name} must be true or false, got {value[:20]!r}.", param=name)


class TtsSocket:
    """One connection: the read loop, the contexts, the sends. See the module docstring."""

    def __init__(self, socket: WebSocket[Any, Any, Any], voice_id: str, *, multi: bool) -> None:
        self.socket = socket
        self.voice_id = voice_id
        self.multi = multi
        self.endpoint = MULTI_STREAM_INPUT if multi else STREAM_INPUT
        self.face = face_of(socket.app)
        self.services = self.face.services
        self.settings = self.services.settings
        self.socket_id = request_id_of(socket.scope)
        self.options: SocketOptions | None = None
        self.contexts: dict[str | None, SpeechContext] = {}
        """Contexts taking text, by id (None: the one context of stream-input)."""
        self.closing_contexts: dict[str | None, SpeechContext] = {}
        """Contexts closed gracefully, still speaking what they were given."""
        self.contexts_started = 0
        self.caller: Caller = caller_of(socket.scope)
        """Who asks (the handshake's key, or the first message's: :meth:`_authenticate`): the
        voice is looked up among its voices, every chunk's slot counts in its fair shares."""
        self.authenticated = not self.face.keys.enabled or self.caller.key_id is not None
        self.closed = False
        self.close_code: int | None = None
        self.outcome = "ok"
        self.error: str | None = None
        self.ending = False
        """close_socket (or stream-input's end of text) was received: no new contexts."""
        self.last_activity = time.monotonic()
        self._send_lock = asyncio.Lock()
        hook = connection_hook(socket.scope)  # absent under another server (tests in process)
        self._abort: Callable[[], None] | None = hook.abort if hook is not None else None

    # --- the connection's life ---------------------------------------------------------------

    async def run(self) -> None:
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(request_id=self.socket_id):
            try:
                self.face.open_socket()
            except GatewayError as exc:
                self.outcome, self.error = "rejected", exc.message
                await self._reject(exc)
                self._log_socket(started)
                return
            try:
                await self.socket.accept(headers={"x-request-id": self.socket_id})
                query = parse_qs(self.socket.scope.get("query_string", b"").decode("latin-1"))
                self.options = SocketOptions.parse(query, self.face)
                if self.authenticated:
                    self._check_voice()  # else once the first message has named the key
                await self._read_loop()
            except SocketClosing as exc:
                await self._fail(exc.error, exc.close_code)
            except GatewayError as exc:
                await self._fail(exc)
            except (ClientGone, WebSocketDisconnect, OSError):
                self.outcome = "cancelled" if self.outcome == "ok" else self.outcome
            except Exception as exc:  # never let a bug become Litestar's 1011 without a message
                _log.exception("websocket_failed", error=repr(exc))
                await self._fail(exc)
            finally:
                await self._end_all()
                self.face.close_socket()
                self._log_socket(started)

    async def _reject(self, exc: GatewayError) -> None:
        """Refuse the upgrade with an HTTP status (where the server can send one)."""
        with contextlib.suppress(Exception):
            await self.socket.receive()  # the connect event
            if "websocket.http.response" in self.socket.scope.get("extensions", {}):
                body = _ENCODER.encode(error_body(exc))
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
                await self.socket.send({"type": "websocket.http.response.start", "status": exc.status_code, "headers": headers})
                await self.socket.send({"type": "websocket.http.response.body", "body": body, "more_body": False})
            else:
                await self.socket.send({"type": "websocket.close", "code": CLOSE_POLICY})

    def _check_voice(self) -> None:
        """An unknown voice (another key's included) fails the socket at once, not at the first
        text."""
        voices, _ = self.services.ready_voices()
        try:
            voices.get(self.voice_id, self.caller.voices)
        except VoiceNotFoundError as exc:
            raise VoiceNotFoundError(exc.message, param="voice_id") from None

    async def _read_loop(self) -> None:
        assert self.options is not None
        lifetime_end = time.monotonic() + self.settings.elevenlabs_max_socket_s
        receiving: asyncio.Future[Any] = asyncio.ensure_future(self.socket.receive())
        try:
            while not self.closed:
                now = time.monotonic()
                idle_end = self.last_activity + self.options.inactivity_timeout_s
                if now >= lifetime_end:
                    raise SocketClosing(InvalidRequestError(
                        f"The socket reached its time limit ({self.settings.elevenlabs_max_socket_s:g} s); open a new one.",
                        code="socket_time_limit",
                    ))
                if now >= idle_end and not self._speaking():
                    raise SocketClosing(InvalidRequestError(
                        f"Have not received a new text input within the timeout of {self.options.inactivity_timeout_s:g} "
                        'seconds. Send text, a keepalive ({"text": ""} on multi-stream-input) or the end of input '
                        '({"text": ""} on stream-input) in time.',
                        code="input_timeout_exceeded",
                    ))
                wait = min(lifetime_end, idle_end if not self._speaking() else now + self.options.inactivity_timeout_s) - now
                done, _ = await asyncio.wait({receiving}, timeout=max(0.0, wait))
                if not done:
                    continue
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    if not self.closed:
                        self.outcome = "cancelled" if self._busy() else self.outcome
                    return
                receiving = asyncio.ensure_future(self.socket.receive())
                self.last_activity = time.monotonic()
                await self._on_message(message)
        finally:
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(BaseException):
                    await receiving

    def _speaking(self) -> bool:
        """A context is making audio: the inactivity clock waits for it to go quiet."""
        return any(ctx.speaking for ctx in (*self.contexts.values(), *self.closing_contexts.values()))

    def _busy(self) -> bool:
        return bool(self.contexts or self.closing_contexts)

    # --- messages ------------------------------------------------------------------------------

    async def _on_message(self, message: dict[str, Any]) -> None:
        data = message.get("text")
        if data is None:
            raise SocketClosing(InvalidRequestError(
                "Messages must be text frames holding a JSON object, not binary frames.", code="invalid_input_message"
            ))
        if len(data) > self.settings.elevenlabs_max_message_bytes:  # the WebSocket layer's bound, here too
            raise SocketClosing(
                InvalidRequestError(f"Message larger than {self.settings.elevenlabs_max_message_bytes} bytes.", code="message_too_big"),
                CLOSE_TOO_BIG,
            )
        msg = decode_client_message(data)
        if not self.authenticated:
            self._authenticate(msg)
        if self.ending:
            return  # after close_socket / the end of input nothing more is taken
        if self.multi:
            await self._on_multi(msg)
        else:
            await self._on_single(msg)

    def _authenticate(self, msg: ClientMessage) -> None:
        """Keys are enforced and the handshake carried none: the first message must (before
        any voice lookup or admission: then the voice is checked as the key sees it)."""
        key = msg.xi_api_key
        if key is None and msg.authorization is not None:
            key = msg.authorization.removeprefix("Bearer ").removeprefix("bearer ").strip()
        if key is None:
            raise SocketClosing(AuthenticationError(
                "Missing API key: send it as the xi-api-key header, or as xi_api_key in the first message."
            ))
        identity = self.face.keys.identify(key.encode("utf-8"))
        if identity is None:
            raise SocketClosing(AuthenticationError("Incorrect API key provided."))
        # the key's caller from now on: its voices, its fair share, its id on the log lines
        self.caller = self.face.keys.caller(self.caller.client, identity)
        remember_caller(self.socket.scope, self.caller)
        self.authenticated = True
        self._check_voice()

    async def _on_single(self, msg: ClientMessage) -> None:
        ctx = self.contexts.get(None) or self._open_context(None)
        if msg.text == "":  # the end of input
            self.ending = True
            await ctx.end(gracefully=True)
            return
        await ctx.take(msg)

    async def _on_multi(self, msg: ClientMessage) -> None:
        if msg.close_socket:
            self.ending = True
            for ctx in list(self.contexts.values()):
                await ctx.end(gracefully=True)
            if not self._busy():
                await self.close(CLOSE_NORMAL)
            return
        context_id = msg.context_id or DEFAULT_CONTEXT
        if msg.close_context:
            ctx = self.contexts.get(context_id)
            if ctx is not None:
                await ctx.end(gracefully=ctx.flushed_last)
            elif (closing := self.closing_contexts.get(context_id)) is not None:
                await closing.end(gracefully=False)  # a second close: barge-in
            return
        ctx = self.contexts.get(context_id)
        if ctx is None:
            if not msg.text and not msg.flush:
                return  # a keepalive (with or without a context): the clock is reset already
            ctx = self._open_context(context_id)
        await ctx.take(msg)

    def _open_context(self, context_id: str | None) -> SpeechContext:
        live = len(self.contexts) + len(self.closing_contexts)
        if live >= self.settings.elevenlabs_max_contexts:
            raise SocketClosing(InvalidRequestError(
                f"Too many contexts open on this socket ({live}, at most {self.settings.elevenlabs_max_contexts}): "
                "close the ones you no longer need (close_context).",
                code="too_many_contexts",
            ))
        assert self.options is not None
        ctx = SpeechContext(self, context_id, self.options)
        self.contexts[context_id] = ctx
        self.contexts_started += 1
        self.face.open_contexts += 1
        return ctx

    # --- sending -------------------------------------------------------------------------------

    async def send(self, payload: msgspec.Struct, *, audio: bool = False) -> None:
        """One message, bounded by ``send_timeout_s`` (a client that stopped reading is dropped)."""
        async with self._send_lock:
            if self.closed:
                raise ClientGone
            try:
                async with asyncio.timeout(self.settings.send_timeout_s):
                    await self.socket.send({"type": "websocket.send", "text": _ENCODER.encode(payload).decode()})
            except TimeoutError:
                self._drop(f"the client left a message pending for {self.settings.send_timeout_s:g} s")
                raise ClientGone from None
            except (WebSocketDisconnect, OSError, RuntimeError):
                self.closed = True
                raise ClientGone from None
        if audio:
            self.last_activity = time.monotonic()

    def _drop(self, reason: str) -> None:
        self.closed = True
        self.outcome, self.error = "timeout", reason
        if self._abort is not None:
            self._abort()

    async def close(self, code: int, reason: str = "") -> None:
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
            self.close_code = code
            with contextlib.suppress(Exception):
                await self.socket.close(code, reason[:120])

    async def _fail(self, exc: BaseException, close_code: int | None = None) -> None:
        """The error message, then the close: the socket is over (the server is not)."""
        error = ws_error(exc)
        if close_code is not None:
            error = msgspec.structs.replace(error, code=close_code)
        self.outcome = {CLOSE_POLICY: "client_error", CLOSE_TOO_BIG: "client_error", CLOSE_TRY_AGAIN: "rejected"}.get(
            error.code, "error"
        )
        self.error = error.message
        with contextlib.suppress(ClientGone):
            await self.send(error)
        await self.close(error.code, error.error)

    async def _end_all(self) -> None:
        """Cancel whatever still runs (client gone, or an error close)."""
        for ctx in [*self.contexts.values(), *self.closing_contexts.values()]:
            await ctx.cancel_now(outcome="cancelled")
        await self.close(CLOSE_NORMAL)

    # --- what contexts report back ----------------------------------------------------------------

    async def context_ended(self, ctx: SpeechContext) -> None:
        if self.contexts.get(ctx.id) is ctx:
            del self.contexts[ctx.id]
        if self.closing_contexts.get(ctx.id) is ctx:
            del self.closing_contexts[ctx.id]
        self.face.open_contexts -= 1
        if self.ending and not self._busy():
            await self.close(CLOSE_NORMAL)  # stream-input's end of text, or close_socket: all done

    def context_closing(self, ctx: SpeechContext) -> None:
        if self.contexts.get(ctx.id) is ctx:
            del self.contexts[ctx.id]
            self.closing_contexts[ctx.id] = ctx

    async def context_failed(self, ctx: SpeechContext, exc: BaseException) -> None:
        """A context's speech failed: stream-input closes (its one utterance is over); on
        multi-stream-input the error names the context and the others go on."""
        if not self.multi:
            await self._fail(exc)
            return
        with contextlib.suppress(ClientGone):
            await self.send(ws_error(exc, ctx.id))

    # --- the log line -----------------------------------------------------------------------------

    def _log_socket(self, started: float) -> None:
        fields: dict[str, Any] = {
            "request_id": self.socket_id,
            "endpoint": self.endpoint,
            "voice": self.voice_id[:80],
            "outcome": self.outcome,
            "close_code": self.close_code,
            "contexts": self.contexts_started,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        if self.error:
            fields["error"] = self.error
        if self.caller.key_id:
            fields["key_id"] = self.caller.key_id
        (_log.info if self.outcome in ("ok", "cancelled") else _log.warning)("websocket", **fields)
        if (metrics := self.face.metrics) is not None:
            metrics.websockets.labels(endpoint=self.endpoint, outcome=self.outcome).inc()


class SpeechContext:
    """One utterance of a socket: its text buffer, its :class:`Utterance`, its sender task."""

    def __init__(self, owner: TtsSocket, context_id: str | None, options: SocketOptions) -> None:
        self.owner = owner
        self.id = context_id
        self.options = options
        self.voice_settings: VoiceSettings | None = None
        self.text = TextStream(DEFAULT_SCHEDULE, auto_mode=options.auto_mode)
        self.utterance: Utterance | None = None
        self.sender: asyncio.Task[None] | None = None
        self.flushed_last = False
        """The last message with anything in it was a flush without new text (see the module
        docstring: a close_context right after it is a graceful end)."""
        self.ended = False
        self.outcome = "ok"
        self.error: str | None = None
        self.refused_by: str | None = None
        """The admission limit that refused a chunk (server, client or key), as on a request's line."""
        self.started = time.monotonic()
        self.first_audio_sent: float | None = None

    @property
    def speaking(self) -> bool:
        return self.sender is not None and not self.sender.done()

    async def take(self, msg: ClientMessage) -> None:
        """A text message: settings (before the first chunk), text, trigger, flush."""
        if self.utterance is None:
            if msg.voice_settings is not None:
                self.voice_settings = msg.voice_settings
            if msg.generation_config is not None and msg.generation_config.chunk_length_schedule:
                self.text.schedule = tuple(msg.generation_config.chunk_length_schedule)
        text = msg.text or ""
        chunks = self.text.push(text) if text else []
        if msg.try_trigger_generation:
            chunks += self.text.trigger()
        if msg.flush:
            chunks += self.text.flush()
        if text.strip():
            self.flushed_last = False
        elif msg.flush:
            self.flushed_last = True
        pending = self.text.buffered + (self.utterance.pending_chars if self.utterance else 0) + sum(map(len, chunks))
        if pending > self.owner.settings.elevenlabs_max_buffered_chars:
            raise SocketClosing(InvalidRequestError(
                f"The context holds more than {self.owner.settings.elevenlabs_max_buffered_chars} characters not spoken "
                "yet; send text no faster than it can be spoken, or in more contexts.",
                code="buffer_limit_exceeded",
            ))
        for chunk in chunks:
            await self._say(chunk)

    async def _say(self, chunk: str) -> None:
        if self.utterance is None:
            self.utterance = await self._start()
        if not self.utterance.failed:
            self.utterance.say(chunk)

    async def _start(self) -> Utterance:
        owner, options = self.owner, self.options
        request = speech_request(
            text="",
            family=options.family,
            voice=owner.voice_id,
            language=options.language,
            voice_settings=self.voice_settings,
            seed=options.seed,
        )
        plan = await plan_speech(owner.services, request, options.output.spec, owner.caller)
        suffix = "" if self.id is None else f"-{self.id[:64]}"
        utterance = Utterance(owner.services, plan, request_id=f"{owner.socket_id}{suffix}")
        self.sender = asyncio.create_task(self._send_audio(utterance), name=f"tts-context-{self.id}")
        return utterance

    async def end(self, *, gracefully: bool) -> None:
        """Graceful: what is buffered is spoken, then isFinal. Otherwise barge-in: stop now."""
        if self.ended:
            return
        if not gracefully:
            await self.cancel_now()
            return
        for chunk in self.text.flush():
            await self._say(chunk)
        self.owner.context_closing(self)
        if self.utterance is None:
            await self._finish()  # nothing was ever said
        else:
            self.utterance.finish()

    async def cancel_now(self, *, outcome: str = "interrupted") -> None:
        """Barge-in (or the socket is going): the engine job cancelled and its slot released
        before this returns; the client gets isFinal if it is still there."""
        if self.ended:
            return
        self.outcome = outcome
        if self.utterance is not None:
            await self.utterance.cancel()
            if self.sender is not None:
                with contextlib.suppress(BaseException):
                    await self.sender  # it sends isFinal and reports the end
                return
        await self._finish()

    async def _send_audio(self, utterance: Utterance) -> None:
        pending: list[ChunkTimings] = []
        try:
            async for event in utterance.events():
                if isinstance(event, ChunkTimings):
                    pending.append(event)
                    continue
                await self.owner.send(self._audio_message(event, pending), audio=True)
                pending = []
                if self.first_audio_sent is None:
                    self.first_audio_sent = time.monotonic()
            if pending:
                await self.owner.send(self._audio_message(None, pending))
        except ClientGone:
            self.outcome = "cancelled" if self.outcome == "ok" else self.outcome
        except Exception as exc:  # the utterance failed: admission, engine, encoder, time limit
            self.outcome, self.error = ("error" if as_gateway_error(exc).status_code >= 500 else "rejected"), getattr(exc, "message", repr(exc))
            if isinstance(exc, OverloadedError):
                self.refused_by = exc.limit
            await self.owner.context_failed(self, exc)
        finally:
            await utterance.aclose()
            await self._finish()

    def _audio_message(self, audio: AudioBytes | None, timings: list[ChunkTimings]) -> WsAudio:
        fields = {
            "audio": None if audio is None else base64.b64encode(audio.data).decode("ascii"),
            "is_final": None,
            "alignment": ws_alignment(timings, spoken=False) if timings else None,
            "normalized_alignment": ws_alignment(timings, spoken=True) if timings else None,
        }
        if self.id is None:
            return WsAudio(**fields)
        return WsContextAudio(**fields, context_id=self.id)

    async def _finish(self) -> None:
        """isFinal (when the client can still hear it), the log line, the metrics; once."""
        if self.ended:
            return
        self.ended = True
        final = WsFinal() if self.id is None else WsContextFinal(context_id=self.id)
        with contextlib.suppress(ClientGone):
            await self.owner.send(final)
        self._log()
        await self.owner.context_ended(self)

    def _log(self) -> None:
        owner = self.owner
        stats = self.utterance.stats if self.utterance is not None else None
        rate = owner.services.engine.sample_rate if owner.services.engine is not None else 24_000
        audio_s = stats.audio_samples / rate if stats else 0.0
        first_audio_s = None
        if stats and stats.first_said_at is not None and self.first_audio_sent is not None:
            first_audio_s = self.first_audio_sent - stats.first_said_at
        fields: dict[str, Any] = {
            "request_id": owner.socket_id,
            "endpoint": owner.endpoint,
            "context_id": self.id,
            "model": self.options.family.id,
            "voice": owner.voice_id[:80],
            "format": self.options.output.name,
            "outcome": self.outcome,
            "chars": stats.chars_said if stats else 0,
            "chunks": stats.chunks_said if stats else 0,
            "audio_s": round(audio_s, 3),
            "first_audio_ms": None if first_audio_s is None else round(first_audio_s * 1000, 1),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if stats and stats.queued_s:
            fields["queued_ms"] = round(stats.queued_s * 1000, 1)
        if self.error:
            fields["error"] = self.error
        if owner.caller.key_id:
            fields["key_id"] = owner.caller.key_id
        if self.refused_by:
            fields.update(limit=self.refused_by, client=owner.caller.client)
        (_log.info if self.outcome in ("ok", "interrupted", "cancelled") else _log.warning)("tts_context", **fields)
        if (metrics := owner.face.metrics) is not None:
            metrics.websocket_contexts.labels(endpoint=owner.endpoint, outcome=self.outcome).inc()
            if first_audio_s is not None:
                metrics.websocket_first_audio.observe(first_audio_s)
            if audio_s > 0:
                metrics.audio_seconds.inc(audio_s)
