"""ElevenLabs' text-to-speech REST routes, over the same speech service as ``/v1/audio/speech``.

- ``POST /v1/text-to-speech/{voice_id}`` and ``.../stream``: the audio file in
  ``output_format``, streamed as it is made: exactly the OpenAI route's path
  (``prepare_speech``: admission, engine job, encoder, one exit stack), with the body, voice
  settings and format names translated.
- ``POST .../with-timestamps``: ``{"audio_base64", "alignment", "normalized_alignment"}``, every
  character's start and end in seconds; ``.../stream/with-timestamps``: the same as
  newline-delimited JSON objects, one per piece of audio, each chunk's timings on the piece
  after its audio is complete. Both run the text as chunks (:class:`gateway.speech.utterance.Utterance`),
  whose boundaries are exact; character times within a chunk are an estimate
  (:mod:`gateway.speech.alignment`).

Every error before the first byte is an ElevenLabs-shaped status (``errors.py``); a client that
leaves stops the work (``unless_disconnected`` before the first byte, the body's ``aclose``
after).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Request, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIMediaType as MediaType
from litestar.openapi.spec import Operation, RequestBody, Schema
from litestar.params import FromPath, Parameter
from litestar.response import Stream

from gateway.errors import InvalidRequestError, VoiceNotFoundError
from gateway.http.disconnect import unless_disconnected
from gateway.http.elevenlabs.controls import speech_request
from gateway.http.elevenlabs.docs import ELEVENLABS_SECURITY, elevenlabs_error_responses
from gateway.http.elevenlabs.face import face_of
from gateway.http.elevenlabs.output_formats import DEFAULT_OUTPUT_FORMAT, OutputFormat, parse_output_format
from gateway.http.elevenlabs.protocol import (
    AudioChunkWithTimestamps,
    AudioWithTimestamps,
    TextToSpeechBody,
)
from gateway.http.elevenlabs.timings import rest_alignment
from gateway.http.protocol import SpeechRequest, decode_json_body
from gateway.http.request_context import request_id_of
from gateway.http.speech import body_stream, inline_schema, require_json
from gateway.observability.request_record import current_record
from gateway.server.services import AppServices
from gateway.speech.service import prepare_speech
from gateway.speech.text_stream import TextStream
from gateway.speech.utterance import AudioBytes, ChunkTimings, Utterance, plan_speech

NDJSON = "application/x-ndjson"
_ERRORS = {
    400: "Invalid request: `param` names the field (malformed JSON, an unknown output_format, an unsupported language)",
    404: "Unknown voice_id (`voice_not_found`) or model_id (`model_not_found`)",
    413: "Body larger than the configured limit",
    429: "Too much work in flight (Retry-After set)",
    503: "Engine loading or failed, or the queue wait limit passed (Retry-After set)",
    504: "The request time limit passed before the first byte",
}
_BODY_DECODER = msgspec.json.Decoder(TextToSpeechBody)
_ENCODER = msgspec.json.Encoder()
_AUDIO_MEDIA_TYPES = ("audio/mpeg", "audio/pcm", "audio/basic", "audio/x-alaw-basic", "audio/ogg", "audio/wav")

OutputFormatQuery = Annotated[
    str | None,
    Parameter(
        description="pcm_<8000-48000>, ulaw_8000, alaw_8000, wav_<rate>, mp3_<rate>_<kbps>, opus_48000_<kbps> "
        f"(default {DEFAULT_OUTPUT_FORMAT})",
        required=False,
    ),
]
IgnoredQuery = Annotated[str | None, Parameter(description="Accepted and ignored.", required=False)]


@dataclass
class _Operation(Operation):
    """The documented body, and the media types of the 200 response (``media_types``)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, content={"application/json": MediaType(schema=inline_schema(TextToSpeechBody))}  # type: ignore[arg-type]
        )


@dataclass
class _AudioOperation(_Operation):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.responses and "200" in self.responses:
            binary = Schema(type="string", format="binary")  # type: ignore[arg-type]
            self.responses["200"].content = {media: MediaType(schema=binary) for media in _AUDIO_MEDIA_TYPES}  # type: ignore[union-attr]


@dataclass
class _NdjsonOperation(_Operation):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.responses and "200" in self.responses:
            line = Schema(type="string", description="Newline-delimited JSON: one AudioChunkWithTimestamps object per line.")  # type: ignore[arg-type]
            self.responses["200"].content = {NDJSON: MediaType(schema=line)}  # type: ignore[union-attr]


def _route_options(summary: str, description: str, operation: type[Operation]) -> dict[str, Any]:
    return {
        "status_code": 200,
        "tags": ["elevenlabs"],
        "summary": summary,
        "operation_class": operation,
        "response_description": description,
        "responses": elevenlabs_error_responses(_ERRORS),
        "security": ELEVENLABS_SECURITY,
    }


@post("/v1/text-to-speech/{voice_id:str}", **_route_options("Text to speech (ElevenLabs)", "The audio in `output_format`.", _AudioOperation))
async def convert(
    request: Request[Any, Any, Any],
    voice_id: FromPath[str],
    services: NamedDependency[AppServices],
    output_format: OutputFormatQuery = None,
    optimize_streaming_latency: IgnoredQuery = None,
    enable_logging: IgnoredQuery = None,
) -> Stream:
    """ElevenLabs-compatible speech: `voice_id` is a voice id, name or alias of GET /v1/voices.
    The audio is sent as it is made (the same as `/stream`)."""
    return await _audio(request, services, voice_id, output_format)


@post(
    "/v1/text-to-speech/{voice_id:str}/stream",
    **_route_options("Stream text to speech (ElevenLabs)", "The audio in `output_format`, sent as it is made.", _AudioOperation),
)
async def stream(
    request: Request[Any, Any, Any],
    voice_id: FromPath[str],
    services: NamedDependency[AppServices],
    output_format: OutputFormatQuery = None,
    optimize_streaming_latency: IgnoredQuery = None,
    enable_logging: IgnoredQuery = None,
) -> Stream:
    """As `POST /v1/text-to-speech/{voice_id}`."""
    return await _audio(request, services, voice_id, output_format)


@post(
    "/v1/text-to-speech/{voice_id:str}/with-timestamps",
    **_route_options("Text to speech with timestamps (ElevenLabs)", "Base64 audio and per-character times.", _Operation),
)
async def convert_with_timestamps(
    request: Request[Any, Any, Any],
    voice_id: FromPath[str],
    services: NamedDependency[AppServices],
    output_format: OutputFormatQuery = None,
    optimize_streaming_latency: IgnoredQuery = None,
    enable_logging: IgnoredQuery = None,
) -> AudioWithTimestamps:
    """The whole audio (base64) with every character's start and end time (seconds). Chunk
    boundaries are exact, character times within a chunk estimated (docs/voice-agents.md)."""
    utterance, fmt = await _start(request, services, voice_id, output_format)

    async def collect() -> AudioWithTimestamps:
        audio = bytearray()
        timings: list[ChunkTimings] = []
        async for event in utterance.events():
            if isinstance(event, AudioBytes):
                audio += event.data
            else:
                timings.append(event)
        current_record().add_audio(utterance.stats.audio_samples)
        return AudioWithTimestamps(
            audio_base64=base64.b64encode(bytes(audio)).decode("ascii"),
            alignment=rest_alignment(timings, spoken=False),
            normalized_alignment=rest_alignment(timings, spoken=True),
        )

    try:
        return await unless_disconnected(request.receive, collect())
    finally:
        await utterance.aclose()


@post(
    "/v1/text-to-speech/{voice_id:str}/stream/with-timestamps",
    **_route_options(
        "Stream text to speech with timestamps (ElevenLabs)",
        "Newline-delimited JSON objects: base64 audio and the timings of each chunk when its audio is complete.",
        _NdjsonOperation,
    ),
)
async def stream_with_timestamps(
    request: Request[Any, Any, Any],
    voice_id: FromPath[str],
    services: NamedDependency[AppServices],
    output_format: OutputFormatQuery = None,
    optimize_streaming_latency: IgnoredQuery = None,
    enable_logging: IgnoredQuery = None,
) -> Stream:
    """As `with-timestamps`, streamed: one JSON object per line (`audio_base64`, `alignment`,
    `normalized_alignment`), times in seconds from the start of the whole audio."""
    utterance, _ = await _start(request, services, voice_id, output_format)
    try:
        events = utterance.events()
        # the first piece before the status line: an engine or admission failure is a status
        first = await unless_disconnected(request.receive, anext(events, None))
    except BaseException:
        await utterance.aclose()
        raise
    return body_stream(_ndjson(utterance, first, events), NDJSON)


async def _ndjson(
    utterance: Utterance, first: AudioBytes | ChunkTimings | None, events: AsyncGenerator[AudioBytes | ChunkTimings, None]
) -> AsyncGenerator[bytes, None]:
    record = current_record()
    pending: list[ChunkTimings] = []
    try:
        event = first
        while event is not None:
            if isinstance(event, ChunkTimings):
                pending.append(event)
            else:
                yield _line(event.data, pending)
                pending = []
            event = await anext(events, None)
        if pending:
            yield _line(b"", pending)
    except Exception as exc:
        record.fail("error", getattr(exc, "message", repr(exc)))
        raise
    finally:
        record.add_audio(utterance.stats.audio_samples)
        await utterance.aclose()


def _line(audio: bytes, timings: list[ChunkTimings]) -> bytes:
    chunk = AudioChunkWithTimestamps(
        audio_base64=base64.b64encode(audio).decode("ascii"),
        alignment=rest_alignment(timings, spoken=False) if timings else None,
        normalized_alignment=rest_alignment(timings, spoken=True) if timings else None,
    )
    return _ENCODER.encode(chunk) + b"\n"


# --- shared steps -------------------------------------------------------------------------------


def _decode(request_body: bytes) -> TextToSpeechBody:
    body = decode_json_body(_BODY_DECODER, request_body)
    if not body.text.strip():
        raise InvalidRequestError("'text' must not be blank.", param="text")
    return body


async def _speech(
    request: Request[Any, Any, Any], voice_id: str, output_format: str | None
) -> tuple[SpeechRequest, OutputFormat]:
    require_json(request)
    body = _decode(await request.body())
    fmt = parse_output_format(output_format)
    family = face_of(request.app).models.resolve(body.model_id, body.language_code)
    speech = speech_request(
        text=body.text,
        family=family,
        voice=voice_id,
        language=body.language_code,
        voice_settings=body.voice_settings,
        seed=body.seed,
    )
    record = current_record()
    record.input_chars = len(body.text)
    return speech, fmt


async def _audio(
    request: Request[Any, Any, Any], services: AppServices, voice_id: str, output_format: str | None
) -> Stream:
    speech, fmt = await _speech(request, voice_id, output_format)
    with voice_id_not_found():
        prepared = await unless_disconnected(
            request.receive, prepare_speech(services, speech, request_id_of(request.scope), output=fmt.spec)
        )
    current_record().response_format = fmt.name
    return body_stream(prepared.body, fmt.media_type)


async def _start(
    request: Request[Any, Any, Any], services: AppServices, voice_id: str, output_format: str | None
) -> tuple[Utterance, OutputFormat]:
    """The whole text said to a new utterance (cut at sentence ends into chunks of at most
    ``max_chunk_chars``), finished."""
    speech, fmt = await _speech(request, voice_id, output_format)
    with voice_id_not_found():
        plan = await plan_speech(services, speech, fmt.spec, text=speech.input)
    record = current_record()
    record.response_format, record.stream_format = fmt.name, "timestamps"
    limit = services.settings.max_chunk_chars
    cutter = TextStream((limit,), max_chars=limit)
    utterance = Utterance(services, plan, request_id=request_id_of(request.scope))
    for chunk in [*cutter.push(speech.input), *cutter.flush()]:
        utterance.say(chunk)
    utterance.finish()
    return utterance, fmt


@contextlib.contextmanager
def voice_id_not_found() -> Iterator[None]:
    """The voice is part of the path here: an unknown one is a 404 naming ``voice_id``."""
    try:
        yield
    except InvalidRequestError as exc:
        if exc.code != "voice_not_found":
            raise
        raise VoiceNotFoundError(exc.message, param="voice_id") from None
