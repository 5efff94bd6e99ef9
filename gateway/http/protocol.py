"""Wire types of the OpenAI-compatible API (msgspec), and the one decoder for the speech body.

The speech body is decoded here rather than by Litestar so that every way a body can be wrong
(malformed JSON, an array, a missing field, a wrong type, an out-of-range value) becomes one
400 ``invalid_request_error`` whose ``param`` names the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from gateway.errors import InvalidRequestError

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
StreamFormat = Literal["audio", "sse"]

MAX_INPUT_CHARS = 4096
MAX_INSTRUCTIONS_CHARS = 4096
# Largest seed every engine can hand to its random generators (numpy's limit).
MAX_SEED = 2**32 - 1


MAX_VOICE_CHARS = 256
"""Longest voice name, alias or id a request may send (plain string or ``{"id"}``)."""


class VoiceRef(msgspec.Struct, forbid_unknown_fields=False):
    """A voice given as an object, as newer OpenAI clients send it: ``{"id": "alloy"}``."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_VOICE_CHARS, description="Voice name, alias or id.")]


class SpeechRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Body of ``POST /v1/audio/speech``. Unknown fields are ignored."""

    model: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=256,
            description="A loaded model (`chatterbox`, `chatterbox-turbo`, `chatterbox-multilingual`) or an "
            "alias: `tts-1` (Turbo when loaded), `tts-1-hd`, `gpt-4o-mini-tts` (Multilingual when loaded; "
            "dated variants too). See GET /v1/models for what this server has loaded.",
        ),
    ]
    input: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_INPUT_CHARS,
            description="Text to speak: 1 to 4096 characters, not blank. Paralinguistic tags such as `[laugh]`, "
            "`[cough]`, `[sigh]` are voiced by chatterbox-turbo and removed for the other models.",
        ),
    ]
    voice: Annotated[
        Annotated[str, Meta(max_length=MAX_VOICE_CHARS)] | VoiceRef,
        Meta(description='A voice name, alias or id (see GET /v1/audio/voices), or `{"id": "..."}`.'),
    ]
    instructions: Annotated[
        Annotated[str, Meta(max_length=MAX_INSTRUCTIONS_CHARS)] | None,
        Meta(
            description="Up to 4096 characters. Accepted for compatibility and ignored: Chatterbox "
            "has no prompt-style control; use `exaggeration` for expressiveness."
        ),
    ] = None
    response_format: Annotated[
        ResponseFormat,
        Meta(description="mp3 (default), opus (Ogg Opus, 48 kHz), aac (ADTS), flac, wav, pcm (s16le, no header)."),
    ] = "mp3"
    speed: Annotated[
        Annotated[float, Meta(ge=0.25, le=4.0)] | None, Meta(description="Tempo, 0.25 to 4.0 (default 1.0); pitch is kept.")
    ] = 1.0
    stream_format: Annotated[
        StreamFormat,
        Meta(description="`audio`: the audio bytes, chunked. `sse`: server-sent events with base64 audio."),
    ] = "audio"

    language: Annotated[
        Annotated[str, Meta(min_length=2, max_length=16)] | None,
        Meta(
            description="ISO 639-1 code of the input's language (`extra_body` in the OpenAI SDK). "
            "chatterbox-multilingual: one of its 23 languages, detected from the input when absent. "
            "The English models take only `en`."
        ),
    ] = None

    # Chatterbox controls (the OpenAI SDK sends these through `extra_body`). Null or absent:
    # the engine default. The outer Annotated carries the description, so that the OpenAPI
    # document shows it on the field rather than inside one branch of the nullable union.
    exaggeration: Annotated[
        Annotated[float, Meta(ge=0.0, le=2.0)] | None,
        Meta(description="Emotion intensity, 0 to 2 (default 0.5)."),
    ] = None
    cfg_weight: Annotated[
        Annotated[float, Meta(ge=0.0, le=1.0)] | None,
        Meta(description="Classifier-free guidance weight (also sets the pace), 0 to 1 (default 0.5)."),
    ] = None
    temperature: Annotated[
        Annotated[float, Meta(gt=0.0, le=5.0)] | None,
        Meta(description="Sampling temperature, above 0 up to 5 (default 0.8)."),
    ] = None
    top_p: Annotated[
        Annotated[float, Meta(gt=0.0, le=1.0)] | None,
        Meta(description="Nucleus sampling, above 0 up to 1 (default 1.0)."),
    ] = None
    min_p: Annotated[
        Annotated[float, Meta(ge=0.0, le=1.0)] | None,
        Meta(description="Min-p sampling, 0 to 1 (default 0.05)."),
    ] = None
    repetition_penalty: Annotated[
        Annotated[float, Meta(ge=1.0, le=2.0)] | None,
        Meta(description="Repetition penalty, 1 to 2 (default 1.2)."),
    ] = None
    seed: Annotated[
        Annotated[int, Meta(ge=0, le=MAX_SEED)] | None,
        Meta(description="Same seed + same request = same audio, 0 to 2^32-1 (default: random). On a GPU engine: under a like load (bf16 kernels vary with the batch)."),
    ] = None

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


CONTROL_FIELDS = ("exaggeration", "cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty", "seed")


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """The OpenAI error envelope, used for every error the gateway returns."""

    error: ErrorDetail


class ModelCard(msgspec.Struct, kw_only=True, omit_defaults=True):
    """OpenAI's model object, plus what a Chatterbox family supports. An alias carries
    ``root``: the loaded model it stands for. (``object`` has no default so that
    ``omit_defaults`` keeps it.)"""

    id: str
    created: int
    owned_by: str
    object: Literal["model"]
    root: str | None = None
    description: str | None = None
    languages: list[str] | None = None
    controls: list[str] | None = None
    """Request controls this model honours."""
    ignored_controls: list[str] | None = None
    """Controls it accepts and ignores."""
    tags: list[str] | None = None
    """Paralinguistic tags it voices (others are removed from the input)."""


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class VoiceCard(msgspec.Struct):
    id: str
    name: str
    aliases: list[str]
    source: str
    object: Literal["voice"] = "voice"


class VoiceList(msgspec.Struct):
    data: list[VoiceCard]
    object: Literal["list"] = "list"


class AudioVoice(msgspec.Struct):
    """One voice in OpenAI's custom-voice shape (``client.audio.voices``), plus our aliases
    and source. ``created_at`` is 0 for voices that ship with the server."""

    id: str
    name: str
    created_at: int
    aliases: list[str]
    source: str
    object: Literal["audio.voice"] = "audio.voice"
    type: Literal["audio_sample"] = "audio_sample"


class AudioVoiceDeleted(msgspec.Struct):
    id: str
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"
    deleted: bool = True


class HealthStatus(msgspec.Struct, omit_defaults=True):
    status: str
    engine: str | None = None
    model: str | None = None


class SpeechUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(msgspec.Struct, tag_field="type", tag="speech.audio.delta"):
    audio: str
    """Base64 of the next bytes of the file in the requested response_format."""


class SpeechAudioDone(msgspec.Struct, tag_field="type", tag="speech.audio.done"):
    usage: SpeechUsage


class SpeechStreamError(msgspec.Struct, tag_field="type", tag="error"):
    """Sent as the last SSE event when synthesis fails after the stream has started."""

    error: ErrorDetail


_SPEECH_DECODER = msgspec.json.Decoder(SpeechRequest)
_AT_FIELD = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_STRING_LENGTH = re.compile(r"Expected `str` of length ([<>])= (\d+)")


T = TypeVar("T")


def decode_json_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a JSON body with ``decoder``; every failure is a 400 naming the offending field."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # msgspec raises UnicodeDecodeError for invalid UTF-8, RecursionError for very deep nesting
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object.",
            param="body",
            code="invalid_json",
        ) from None


def decode_speech_request(body: bytes) -> SpeechRequest:
    """Decode and validate a speech body; every failure is a 400 naming the offending field."""
    request = decode_json_body(_SPEECH_DECODER, body)
    if not request.input.strip():
        raise InvalidRequestError("'input' must not be blank.", param="input")
    if not request.voice_name.strip():
        raise InvalidRequestError("'voice' must not be blank.", param="voice")
    return request


def _validation_error(detail: str) -> InvalidRequestError:
    if detail.startswith("Expected `object`, got"):
        # The document itself is not an object (an array, a string, ...).
        return InvalidRequestError(
            f"The request body must be a JSON object: {detail}.", param="body", code="invalid_json"
        )
    at = _AT_FIELD.search(detail)
    missing = _MISSING_FIELD.search(detail)
    if missing and not at:
        field = missing.group(1)
        return InvalidRequestError(f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter")
    param = at.group(1) if at else None
    length = _STRING_LENGTH.match(detail)
    if at and length:
        # in words, not msgspec's "Expected `str` of length >= 1"
        bound, limit = length.group(1), int(length.group(2))
        if bound == ">" and limit == 1:
            return InvalidRequestError(f"'{param}' must not be empty.", param=param)
        least = "at least" if bound == ">" else "at most"
        return InvalidRequestError(f"'{param}' must be {least} {limit} characters long.", param=param)
    if at:
        detail = detail[: at.start()].rstrip(" -")
    where = f" for '{param}'" if param else ""
    return InvalidRequestError(f"Invalid value{where}: {detail}.", param=param)
