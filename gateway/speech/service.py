"""One speech request, from a validated body to the bytes of the response.

``prepare_speech`` does everything that can fail with a client error (model, voice, text)
or a 503 (engine not ready) before the response starts, then starts synthesis and waits for
the engine's first audio and the encoder's first bytes, so a failure to start is still a
proper error response. What it
returns is an async byte iterator for Litestar's ``Stream``: engine audio -> FFmpeg encoder
-> bytes, or the same bytes wrapped as server-sent events. Closing that iterator (the client
hung up) closes the encoder, which closes the engine's iterator, which cancels the job.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np
import structlog

from gateway.speech.admission import deadline_iter, hold_slot, within_deadline
from gateway.audio.encoder import CONTENT_TYPES, encode_audio
from gateway.engine.base import AudioChunk, GenerationParams, SynthesisJob
from gateway.errors import EncoderError, GatewayError, InvalidRequestError, VoiceNotFoundError
from gateway.speech.model_names import resolve_model
from gateway.observability.request_record import RequestRecord, current_record, watched_stream
from gateway.http.protocol import (
    CONTROL_FIELDS,
    ErrorDetail,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechRequest,
    SpeechStreamError,
    SpeechUsage,
)
from gateway.server.services import AppServices
from gateway.settings import Settings
from gateway.speech.text import normalize_text, split_text

SSE_CONTENT_TYPE = "text/event-stream"

T = TypeVar("T")

_SSE_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class PreparedSpeech:
    media_type: str
    body: AsyncGenerator[bytes, None]
    """Yields the response body; ``aclose()`` cancels the synthesis behind it."""


@dataclass(slots=True)
class _Usage:
    input_tokens: int = 0
    output_tokens: int = 0


def generation_params(request: SpeechRequest, settings: Settings) -> GenerationParams:
    """The request's Chatterbox controls over the engine defaults, bounded by the settings."""
    given: dict[str, Any] = {
        name: getattr(request, name) for name in CONTROL_FIELDS if getattr(request, name) is not None
    }
    return GenerationParams(**given, max_speech_tokens=settings.max_speech_tokens)


async def prepare_speech(services: AppServices, request: SpeechRequest, request_id: str) -> PreparedSpeech:
    """Validate and resolve everything, start synthesis, and return the response body."""
    settings = services.settings
    deadline = time.monotonic() + settings.request_timeout_s
    record = current_record()
    record.model, record.voice = request.model, request.voice_name
    record.response_format, record.stream_format = request.response_format, request.stream_format
    record.input_chars = len(request.input)
    resolve_model(request.model)
    engine = services.ready_engine()
    voices, voice_cache = services.ready_voices()
    try:
        voice_info = voices.get(request.voice_name)
    except VoiceNotFoundError as exc:
        # A speech request names a voice as a parameter: an unknown one is a bad value (400),
        # never a silent fallback to another voice.
        raise InvalidRequestError(exc.message, param="voice", code="voice_not_found") from None
    chunks = tuple(split_text(normalize_text(request.input), settings.max_chunk_chars))
    if not chunks:
        raise InvalidRequestError("'input' has no speakable text.", param="input")

    # Admission before any engine work (conditionals included): 429 at once when full.
    slot = await services.admission.acquire()
    record.queued_s = slot.queued_s
    try:
        try:
            async with within_deadline(deadline):
                voice = await voice_cache.get(voice_info)
        except VoiceNotFoundError as exc:  # e.g. the checkpoint voice of an engine without one
            raise InvalidRequestError(exc.message, param="voice", code="voice_not_found") from None
        job = SynthesisJob(
            request_id=request_id,
            chunks=chunks,
            voice=voice,
            params=generation_params(request, settings),
            streaming=True,
        )
        usage = _Usage(input_tokens=sum(engine.count_text_tokens(chunk) for chunk in chunks))
        speed = 1.0 if request.speed is None else request.speed
        # The engine's first chunk, then the encoder's first bytes, before the status line:
        # the encoder alone would not do, as WAV's header leaves before any audio exists.
        async with within_deadline(deadline):
            produced = await _primed(engine.synthesize(job))
        encoded = _encoded_audio(produced, engine.sample_rate, request.response_format, speed, usage, record)
        # the total time limit bounds every step, from the first byte to the last
        audio = await _primed(deadline_iter(encoded, deadline, what="speech request"))
    except BaseException:
        slot.release()
        raise
    if request.stream_format == "sse":
        return PreparedSpeech(media_type=SSE_CONTENT_TYPE, body=hold_slot(_sse_events(audio, usage), slot))
    body = hold_slot(watched_stream(audio, record), slot)
    return PreparedSpeech(media_type=CONTENT_TYPES[request.response_format], body=body)


async def _encoded_audio(
    produced: AsyncGenerator[AudioChunk, None],
    sample_rate: int,
    response_format: str,
    speed: float,
    usage: _Usage,
    record: RequestRecord,
) -> AsyncGenerator[bytes, None]:
    async def samples() -> AsyncIterator[np.ndarray]:
        async for chunk in produced:
            usage.output_tokens += chunk.speech_tokens
            record.add_audio(len(chunk.samples))
            yield chunk.samples

    encoded = encode_audio(samples(), response_format=response_format, sample_rate=sample_rate, speed=speed)
    try:
        async for data in encoded:
            yield data
    except EncoderError:
        record.encoder_failed = True
        raise
    finally:
        # The encoder closes its input, but the engine's iterator is closed here as well: an
        # iterator that was never started is not closed by closing its consumer.
        await _aclose(encoded)
        await _aclose(produced)


async def _sse_events(audio: AsyncGenerator[bytes, None], usage: _Usage) -> AsyncGenerator[bytes, None]:
    try:
        async for data in audio:
            yield _event(SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii")))
        yield _event(
            SpeechAudioDone(
                usage=SpeechUsage(
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    total_tokens=usage.input_tokens + usage.output_tokens,
                )
            )
        )
    except Exception as exc:  # the status line is gone: the error travels as the last event
        detail = _error_detail(exc)
        current_record().fail("timeout" if detail.code == "timeout" else "error", detail.message)
        structlog.get_logger("gateway.speech").error("speech_stream_failed", error=detail.message, exc_info=exc)
        yield _event(SpeechStreamError(error=detail))
    finally:
        await _aclose(audio)


def _event(payload: msgspec.Struct) -> bytes:
    return b"data: " + _SSE_ENCODER.encode(payload) + b"\n\n"


def _error_detail(exc: Exception) -> ErrorDetail:
    if isinstance(exc, GatewayError):
        return ErrorDetail(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
    return ErrorDetail(
        message="The server had an error while processing your request.", type="server_error", param=None, code=None
    )


async def _primed(items: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Wait for the first item before the response starts, so a failure to start is still an
    error response; then yield it and the rest. Closing the result closes ``items``."""
    try:
        first = await anext(items)
    except StopAsyncIteration:
        await _aclose(items)
        return _empty()
    except BaseException:
        await _aclose(items)
        raise

    async def chained() -> AsyncGenerator[T, None]:
        try:
            yield first
            async for item in items:
                yield item
        finally:
            await _aclose(items)

    return chained()


async def _empty() -> AsyncGenerator[Any, None]:
    return
    yield


async def _aclose(iterator: object) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(RuntimeError):
            # RuntimeError: the generator is already running its own cleanup in another frame.
            await close()
