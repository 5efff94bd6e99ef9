"""One speech request, from a validated body to the bytes of the response.

``prepare_speech`` does everything that can fail with a client error (model, voice, text)
or a 503 (engine not ready, no admission slot in time) before the response starts, then
starts synthesis and waits for the engine's first audio and the encoder's first bytes, so a
failure to start is still a proper error response. It returns one body generator.

One owner for cleanup: the admission slot, the engine's audio iterator and the encoder are
entered into a single ``AsyncExitStack`` as they are acquired, and the body generator holds
that stack. However the body ends (last byte sent, client gone, time limit, engine or
encoder failure), the stack unwinds in reverse: the encoder is closed (its FFmpeg process
killed and reaped), the engine's iterator is closed (the engine drops the job), and only
then is the slot released. A failure before the body exists unwinds the same stack at once.

After the status line an error can no longer be a status: an ``audio`` body is cut short
(the server drops the connection without the final chunk, so the client sees a truncated
response, not a short file that looks complete); an ``sse`` body ends with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import numpy as np
import structlog

from gateway.audio.encoder import CONTENT_TYPES, encode_audio
from gateway.audio.formats import FormatSpec
from gateway.engine.base import AudioChunk, GenerationParams, SynthesisJob
from gateway.errors import (
    EncoderError,
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    VoiceNotFoundError,
)
from gateway.http.caller import Caller
from gateway.http.errors import error_response
from gateway.models.families import Family
from gateway.http.protocol import (
    CONTROL_FIELDS,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechRequest,
    SpeechStreamError,
    SpeechUsage,
)
from gateway.iterators import aclose_quietly
from gateway.observability.request_record import RequestRecord, current_record
from gateway.server.services import AppServices
from gateway.settings import Settings
from gateway.speech.admission import Slot, next_within, within_deadline
from gateway.speech.languages import resolve_language
from gateway.speech.tags import protect, remove_tags, restore
from gateway.speech.text import split_text
from gateway.voices.library import VoiceInfo

SSE_CONTENT_TYPE = "text/event-stream"

_SSE_ENCODER = msgspec.json.Encoder()


class SpeechBody:
    """The response body: iterate it for the bytes; ``aclose()`` ends the request's work (engine
    job, encoder, admission slot) whether or not iteration ever started. (Closing a generator
    that never started runs none of its code, so the stack is closed here as well.)"""

    def __init__(self, body: AsyncGenerator[bytes, None], stack: contextlib.AsyncExitStack) -> None:
        self._body = body
        self._stack = stack

    def __aiter__(self) -> SpeechBody:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._body)

    async def aclose(self) -> None:
        try:
            await aclose_quietly(self._body)
        finally:
            await _unwind(self._stack)  # a no-op once the body has unwound it


@dataclass(frozen=True, slots=True)
class PreparedSpeech:
    media_type: str
    body: SpeechBody


@dataclass(slots=True)
class _Usage:
    input_tokens: int = 0
    output_tokens: int = 0


def generation_params(request: SpeechRequest, settings: Settings, family: Family) -> GenerationParams:
    """The request's controls that ``family`` honours over the family's defaults (upstream's),
    bounded by the settings. Controls it cannot honour are dropped: see :func:`ignored_controls`."""
    given: dict[str, Any] = dict(family.defaults)
    given.update(
        (name, getattr(request, name))
        for name in CONTROL_FIELDS
        if name in family.honoured and getattr(request, name) is not None
    )
    return GenerationParams(**given, max_speech_tokens=settings.max_speech_tokens)


def ignored_controls(request: SpeechRequest, family: Family) -> tuple[str, ...]:
    """Controls the request set that ``family`` accepts and ignores (for the log line)."""
    return tuple(name for name in family.ignored if getattr(request, name) is not None)


def speech_chunks(text: str, family: Family, max_chars: int) -> tuple[str, ...]:
    """The input as the family's chunks: its paralinguistic tags kept whole (normalisation and
    cuts never touch them), other families' tags removed."""
    if not family.tags:
        text = remove_tags(text)
        if not text.strip():
            raise InvalidRequestError(
                f"'input' holds only paralinguistic tags, which the model '{family.id}' does not voice.", param="input"
            )
    return tuple(restore(chunk) for chunk in split_text(protect(text, family.tags), max_chars))


INLINE_SPLIT_CHARS = 500
"""Inputs up to this many characters are split on the event loop (~50 us for 120 characters,
~0.65 ms for 1000, measured on the 2-core development machine); longer ones on a worker
thread. The hop to a thread and back costs more than the work for short inputs, and under
load far more: each side waits for the GIL (up to the interpreter's 5 ms switch interval), so
on an H200 serving 32 streams this stage took 24 ms of every request's first audio with a
~50 us split behind it (docs/benchmarks.md, eighth session)."""


async def split_speech(text: str, family: Family, max_chars: int) -> tuple[str, ...]:
    """:func:`speech_chunks`, inline for a short input, on a worker thread for a long one (up to
    4096 characters of normalising and splitting: milliseconds of CPU kept off the event loop)."""
    if len(text) <= INLINE_SPLIT_CHARS:
        return speech_chunks(text, family, max_chars)
    return await asyncio.to_thread(speech_chunks, text, family, max_chars)


async def prepare_speech(
    services: AppServices,
    request: SpeechRequest,
    request_id: str,
    caller: Caller,
    *,
    output: FormatSpec | None = None,
) -> PreparedSpeech:
    """Validate and resolve everything, start synthesis, and return the response body. The
    voice is looked up among those ``caller`` may use, and its client and key take their
    shares of admission. ``output``: encode into this spec instead of
    ``request.response_format`` (the caller then knows the media type: the ElevenLabs routes'
    ``output_format`` names)."""
    settings = services.settings
    deadline = time.monotonic() + settings.request_timeout_s
    record = current_record()
    record.model, record.voice = request.model, request.voice_name
    record.response_format, record.stream_format = request.response_format, request.stream_format
    record.input_chars = len(request.input)
    family, voice_info = resolve_model_and_voice(services, request, caller)
    engine = services.ready_engine()
    _, voice_cache = services.ready_voices()
    record.mark("model and voice resolved")
    language = await resolve_language_of(family, request.language, request.input)
    record.language = language
    chunks = await split_speech(request.input, family, settings.max_chunk_chars)
    record.mark("text split")
    speed = 1.0 if request.speed is None else request.speed
    record.speed = speed
    usage = _Usage(input_tokens=sum(engine.count_text_tokens(chunk, family.id, language) for chunk in chunks))

    stack = contextlib.AsyncExitStack()
    try:
        # Admission before any engine work (conditionals included): 429 at once when full.
        slot = await admit(services, caller, record)
        stack.callback(slot.release)
        record.queued_s = slot.queued_s
        record.mark("admitted")
        async with within_deadline(deadline):
            with voice_is_a_parameter():  # e.g. the checkpoint voice of an engine without one
                voice = await voice_cache.get(voice_info, family.id)
        record.mark("voice conditionals ready")
        job = SynthesisJob(
            request_id=request_id,
            chunks=chunks,
            voice=voice,
            params=generation_params(request, settings, family),
            model=family.id,
            language=language,
            streaming=True,
            trace=record.timeline,
        )
        produced = engine.synthesize(job)
        stack.push_async_callback(aclose_quietly, produced)
        # The engine's first audio, then the encoder's first bytes, before the status line:
        # the encoder alone would not do, as WAV's header leaves before any audio exists.
        first_audio = await _next(produced, deadline, None)
        record.mark("engine first audio")
        encoded = encode_audio(
            _counted(first_audio, produced, usage, record),
            response_format=output or request.response_format,
            sample_rate=engine.sample_rate,
            speed=speed,
            route=settings.audio_encoder,
        )
        stack.push_async_callback(aclose_quietly, encoded)
        first_bytes = await _next(encoded, deadline, record)
        record.mark("encoder first bytes")
    except BaseException:
        await _unwind(stack)
        raise
    sse = request.stream_format == "sse"
    body = SpeechBody(_body(stack, first_bytes, encoded, deadline, sse=sse, usage=usage, record=record), stack)
    return PreparedSpeech(media_type=SSE_CONTENT_TYPE if sse else CONTENT_TYPES[request.response_format], body=body)


async def _body(
    stack: contextlib.AsyncExitStack,
    first: bytes | None,
    encoded: AsyncIterator[bytes],
    deadline: float,
    *,
    sse: bool,
    usage: _Usage,
    record: RequestRecord,
) -> AsyncGenerator[bytes, None]:
    """The response body: owns ``stack`` (slot, engine job, encoder) and closes it on any exit."""
    try:
        data = first
        while data is not None:
            yield _sse_event(SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii"))) if sse else data
            data = await _next(encoded, deadline, record)
        if sse:
            total = usage.input_tokens + usage.output_tokens
            done = SpeechUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=total)
            yield _sse_event(SpeechAudioDone(usage=done))
    except Exception as exc:  # the status line is gone: record why, then end the body
        message = exc.message if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
        timed_out = isinstance(exc, RequestTimeoutError)
        record.fail("timeout" if timed_out else "error", message)
        if not timed_out:  # a time limit is no fault: the request's own line says it
            # one line: a failure we raised ourselves (an engine replica that died, FFmpeg) says
            # what happened in its message; a traceback only for what we did not foresee
            foreseen = isinstance(exc, GatewayError) and exc.__cause__ is None
            structlog.get_logger("gateway.speech").error(
                "speech_stream_failed", error=message, code=getattr(exc, "code", None),
                exc_info=None if foreseen else exc,
            )
        if not sse:
            raise  # cuts the connection (the response guard ends it without another traceback)
        yield _sse_event(SpeechStreamError(error=error_response(exc).error))
    finally:
        await _unwind(stack)


async def _unwind(stack: contextlib.AsyncExitStack) -> None:
    """Close the request's resources, shielded: a body cancelled inside an anyio scope (a
    client disconnect in Litestar's stream task group) has every later await cancelled too,
    which would cut the encoder's and the engine's cleanup short."""
    with anyio.CancelScope(shield=True):
        await stack.aclose()


async def _next(items: AsyncIterator[Any], deadline: float, record: RequestRecord | None) -> Any:
    """The next item (None when there is none) within the request's time limit; an encoder
    failure is marked on ``record`` (None for the engine's iterator)."""
    try:
        return await next_within(items, deadline, what="speech request")
    except StopAsyncIteration:
        return None
    except EncoderError:
        if record is not None:
            record.encoder_failed = True
        raise


async def _counted(
    first: AudioChunk | None, rest: AsyncIterator[AudioChunk], usage: _Usage, record: RequestRecord
) -> AsyncIterator[np.ndarray]:
    """The engine's samples for the encoder, counting speech tokens and audio as they pass.
    (The engine's iterator is closed by the request's exit stack, not here.)"""
    if first is None:
        return
    chunk: AudioChunk | None = first
    while chunk is not None:
        usage.output_tokens += chunk.speech_tokens
        record.add_audio(len(chunk.samples))
        yield chunk.samples
        chunk = await anext(rest, None)


def resolve_model_and_voice(
    services: AppServices, request: SpeechRequest, caller: Caller
) -> tuple[Family, VoiceInfo]:
    """The loaded family the request's model name means (404 otherwise) and its voice among
    those ``caller`` may use (400 when unknown: another key's voice is unknown too); 503 while
    the engine loads. Records the family and the ignored controls."""
    record = current_record()
    family = services.model_names.resolve(request.model)
    record.family = family.id
    record.ignored_controls = ignored_controls(request, family)
    services.ready_engine()
    voices, _ = services.ready_voices()
    with voice_is_a_parameter():
        return family, voices.get(request.voice_name, caller.voices)


async def admit(services: AppServices, caller: Caller, record: RequestRecord) -> Slot:
    """An admission slot in ``caller``'s fair shares (its client's and its key's); a 429 names
    the limit that refused it on ``record`` (the log line's ``limit``)."""
    try:
        return await services.admission.acquire(client=caller.client, key=caller.key_id)
    except OverloadedError as exc:
        record.refused_by = exc.limit
        raise


async def resolve_language_of(family: Family, language: str | None, text: str) -> str:
    """``language`` checked against ``family``, or detected from ``text`` (400 when neither works)."""
    if family.multilingual and language is None:
        # detection loads Lingua's models on first use (seconds): off the event loop
        return await asyncio.to_thread(resolve_language, family, None, text)
    return resolve_language(family, language, text)


@contextlib.contextmanager
def voice_is_a_parameter() -> Iterator[None]:
    """A speech request names its voice as a parameter: an unknown one is a bad value (400
    naming ``voice``), never a silent fallback to another voice."""
    try:
        yield
    except VoiceNotFoundError as exc:
        raise InvalidRequestError(exc.message, param="voice", code="voice_not_found") from None


def _sse_event(payload: msgspec.Struct) -> bytes:
    return b"data: " + _SSE_ENCODER.encode(payload) + b"\n\n"
