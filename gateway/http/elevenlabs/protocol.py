"""Wire types of the ElevenLabs-compatible face (msgspec): the REST bodies and responses, the
voices, and the WebSocket messages both ways.

Names and casing are ElevenLabs': REST and client WebSocket messages in snake_case
(``voice_settings``, ``context_id``), server WebSocket messages in camelCase (``isFinal``,
``contextId``, ``charStartTimesMs``). Fields ElevenLabs defines that Chatterbox has no use for
(``pronunciation_dictionary_locators``, ``previous_text``, ``apply_text_normalization``, ...)
are accepted and ignored, as are unknown fields: clients send them by default.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from gateway.errors import InvalidRequestError
from gateway.http.protocol import MAX_SEED, MAX_VOICE_CHARS

MAX_TEXT_CHARS = 5000
"""Longest ``text`` of one REST request (ElevenLabs' own limit for its standard models)."""
MAX_ID_CHARS = 256
"""Longest ``model_id`` or ``context_id``."""
MIN_SCHEDULE_CHARS = 50
MAX_SCHEDULE_CHARS = 500
"""ElevenLabs' documented range of each ``chunk_length_schedule`` value."""
MAX_SCHEDULE_LENGTH = 16

Unit = Annotated[float, Meta(ge=0.0, le=1.0)]


class VoiceSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """ElevenLabs' voice settings; each maps onto a Chatterbox control (docs/voice-agents.md).
    Null or absent: the model's default."""

    stability: Annotated[
        Unit | None,
        Meta(description="0-1. Lower is more expressive: sets `exaggeration` to (1 - stability) + style."),
    ] = None
    similarity_boost: Annotated[
        Unit | None,
        Meta(description="0-1. Adherence to the voice and text: sets `cfg_weight` to similarity_boost x 2/3."),
    ] = None
    style: Annotated[Unit | None, Meta(description="0-1. Added to the expressiveness (see stability).")] = None
    use_speaker_boost: Annotated[bool | None, Meta(description="Accepted and ignored.")] = None
    speed: Annotated[
        Annotated[float, Meta(ge=0.25, le=4.0)] | None, Meta(description="Tempo, 0.25-4 (pitch kept), default 1.")
    ] = None


class TextToSpeechBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Body of ``POST /v1/text-to-speech/{voice_id}`` (and ``/stream``, ``/with-timestamps``)."""

    text: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS, description="Text to speak, up to 5000 characters.")]
    model_id: Annotated[
        Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None,
        Meta(
            description="An ElevenLabs model id, mapped onto the loaded Chatterbox families (flash/turbo ids -> "
            "chatterbox-turbo, multilingual and v3 ids -> chatterbox-multilingual, other eleven_* ids -> chatterbox), "
            "or one of our own model names. Absent: the server's first model."
        ),
    ] = None
    language_code: Annotated[
        Annotated[str, Meta(min_length=2, max_length=16)] | None,
        Meta(description="ISO 639-1 code. A language the mapped model does not speak moves to chatterbox-multilingual when it is loaded."),
    ] = None
    voice_settings: VoiceSettings | None = None
    seed: Annotated[
        Annotated[int, Meta(ge=0, le=MAX_SEED)] | None,
        Meta(description="Same seed + same request = same audio (0 to 2^32-1); on a GPU engine under a like load."),
    ] = None
    previous_text: Annotated[str | None, Meta(description="Accepted and ignored.")] = None
    next_text: Annotated[str | None, Meta(description="Accepted and ignored.")] = None
    apply_text_normalization: Annotated[str | None, Meta(description="Accepted and ignored: text is always normalised.")] = None


class CharacterAlignment(msgspec.Struct):
    """REST timings: absolute seconds from the start of the audio."""

    characters: list[str]
    character_start_times_seconds: list[float]
    character_end_times_seconds: list[float]


class AudioWithTimestamps(msgspec.Struct):
    """``POST .../with-timestamps``: the whole audio and every character's time."""

    audio_base64: str
    alignment: CharacterAlignment | None
    normalized_alignment: CharacterAlignment | None


class AudioChunkWithTimestamps(msgspec.Struct):
    """One line (newline-delimited JSON) of ``POST .../stream/with-timestamps``."""

    audio_base64: str
    alignment: CharacterAlignment | None
    normalized_alignment: CharacterAlignment | None


class ElevenLabsVoice(msgspec.Struct, kw_only=True):
    """One voice in ElevenLabs' shape (the fields its clients read), plus our aliases."""

    voice_id: str
    name: str
    category: Literal["premade", "cloned"]
    """``premade``: shipped with the server (or the model's own); ``cloned``: a user voice."""
    description: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    preview_url: str | None = None
    available_for_tiers: list[str] = msgspec.field(default_factory=list)
    settings: VoiceSettings | None = None
    high_quality_base_model_ids: list[str] = msgspec.field(default_factory=list)
    created_at_unix: int | None = None
    aliases: list[str] = msgspec.field(default_factory=list)


class ElevenLabsVoices(msgspec.Struct):
    voices: list[ElevenLabsVoice]


class ElevenLabsErrorDetail(msgspec.Struct, omit_defaults=True):
    status: str
    """A short code (``voice_not_found``, ``invalid_api_key``, ...)."""
    message: str
    param: str | None = None


class ElevenLabsError(msgspec.Struct):
    """ElevenLabs' error shape: ``{"detail": {"status", "message"}}`` (plus ``param`` when the
    error is about one field)."""

    detail: ElevenLabsErrorDetail


# --- WebSocket: client -> server ----------------------------------------------------------------


class GenerationConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    chunk_length_schedule: (
        Annotated[
            list[Annotated[int, Meta(ge=MIN_SCHEDULE_CHARS, le=MAX_SCHEDULE_CHARS)]],
            Meta(min_length=1, max_length=MAX_SCHEDULE_LENGTH),
        ]
        | None
    ) = None


class ClientMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Every message a client sends on ``stream-input`` or ``multi-stream-input``."""

    text: str | None = None
    flush: bool | None = None
    try_trigger_generation: bool | None = None
    voice_settings: VoiceSettings | None = None
    generation_config: GenerationConfig | None = None
    xi_api_key: str | None = None
    authorization: str | None = None
    context_id: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    close_context: bool | None = None
    close_socket: bool | None = None


_CLIENT_DECODER = msgspec.json.Decoder(ClientMessage)


def decode_client_message(data: str | bytes) -> ClientMessage:
    """One client message; InvalidRequestError (``invalid_input_message``) naming what is wrong."""
    try:
        return _CLIENT_DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequestError(
            f"Could not parse the message ({exc}): each message must be a JSON object following the protocol.",
            code="invalid_input_message",
        ) from None


# --- WebSocket: server -> client ----------------------------------------------------------------


class WsAlignment(msgspec.Struct, rename="camel"):
    """Times in integer milliseconds from the start of the text chunk's audio (ElevenLabs'
    "from the start of the audio chunk that generated them"); a chunk's durations add up to
    its exact length."""

    chars: list[str]
    char_start_times_ms: list[int]
    char_durations_ms: list[int]


class WsAudio(msgspec.Struct, rename="camel"):
    audio: str | None
    """Base64 of the next bytes of the context's audio file; null on a message that only
    carries timings."""
    is_final: None
    normalized_alignment: WsAlignment | None
    alignment: WsAlignment | None


class WsContextAudio(WsAudio, rename="camel"):
    context_id: str


class WsFinal(msgspec.Struct, rename="camel"):
    is_final: Literal[True] = True


class WsContextFinal(WsFinal, rename="camel"):
    context_id: str = ""


class WsError(msgspec.Struct, rename="camel", omit_defaults=True):
    """ElevenLabs' error message (``{"message", "error", "code"}``), sent before the server
    closes (``code`` is the close code that follows)."""

    message: str
    error: str
    code: int
    context_id: str | None = None


MAX_VOICE_ID_CHARS = MAX_VOICE_CHARS
