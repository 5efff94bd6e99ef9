"""What each response format is, once, for both encoder routes (FFmpeg process, in-process).

A route reads this table and nothing else about a format, so the two cannot drift apart:
the same muxer, encoder, rate, bit rate and muxer options whichever one runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import InvalidRequestError

CONTENT_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

MIN_SPEED = 0.25
MAX_SPEED = 4.0
OUTPUT_SAMPLE_RATE = 24_000
OPUS_SAMPLE_RATE = 48_000


@dataclass(frozen=True)
class FormatSpec:
    container: str
    """FFmpeg muxer name."""
    codec: str
    """FFmpeg encoder name."""
    sample_rate: int
    bit_rate: int | None = None
    sample_fmt: str | None = None
    """Encoder sample format; None: the one nearest float input that the encoder takes."""
    muxer_options: Mapping[str, str] = field(default_factory=dict)
    bitexact: bool = False
    """No encoder/version tags, so the header is exactly what the Python WAV path writes."""


FORMATS: dict[str, FormatSpec] = {
    "mp3": FormatSpec("mp3", "libmp3lame", OUTPUT_SAMPLE_RATE, bit_rate=64_000),
    # page_duration: microseconds of audio per Ogg page. One 20 ms Opus packet per page, so
    # each page leaves as soon as it is encoded instead of after the 1 s default.
    "opus": FormatSpec("ogg", "libopus", OPUS_SAMPLE_RATE, bit_rate=32_000, muxer_options={"page_duration": "20000"}),
    "aac": FormatSpec("adts", "aac", OUTPUT_SAMPLE_RATE, bit_rate=64_000),
    "flac": FormatSpec("flac", "flac", OUTPUT_SAMPLE_RATE, sample_fmt="s16"),
    "wav": FormatSpec("wav", "pcm_s16le", OUTPUT_SAMPLE_RATE, bitexact=True),
    "pcm": FormatSpec("s16le", "pcm_s16le", OUTPUT_SAMPLE_RATE),
}


def spec_of(response_format: str | FormatSpec) -> FormatSpec:
    """A format's spec: one of :data:`FORMATS` by name, or a spec built by the caller (the
    rate, codec and bit rate that a name such as ElevenLabs' ``pcm_16000`` stands for)."""
    return response_format if isinstance(response_format, FormatSpec) else FORMATS[response_format]


# --- formats at other rates and bit rates (ElevenLabs' ``output_format`` names are built from
# these in gateway.http.elevenlabs.output_formats). Both encoder routes resample from the
# engine's 24 kHz to ``sample_rate`` (PyAV's encoder resampler, FFmpeg's ``-ar``).

MP3_SAMPLE_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
"""Rates MPEG-1/2/2.5 Layer III can carry."""
MIN_PCM_SAMPLE_RATE = 8_000
MAX_PCM_SAMPLE_RATE = 48_000


def pcm_spec(sample_rate: int) -> FormatSpec:
    """Raw s16le mono at ``sample_rate`` (no header)."""
    return FormatSpec("s16le", "pcm_s16le", sample_rate)


def wav_spec(sample_rate: int) -> FormatSpec:
    """Streamed WAV (s16le mono) at ``sample_rate``, the same header as the 24 kHz one."""
    return FormatSpec("wav", "pcm_s16le", sample_rate, bitexact=True)


def g711_spec(law: str, sample_rate: int = 8_000) -> FormatSpec:
    """Raw G.711 (``law``: ``mulaw`` or ``alaw``), one byte per sample, no header: what
    telephony (Twilio's media streams) plays."""
    if law not in ("mulaw", "alaw"):
        raise ValueError(f"G.711 law must be mulaw or alaw, got {law!r}")
    return FormatSpec(law, f"pcm_{law}", sample_rate)


def mp3_spec(sample_rate: int, bit_rate: int) -> FormatSpec:
    return FormatSpec("mp3", "libmp3lame", sample_rate, bit_rate=bit_rate)


def opus_spec(bit_rate: int) -> FormatSpec:
    """Ogg Opus at 48 kHz and ``bit_rate``, one 20 ms packet per page (see FORMATS)."""
    return FormatSpec("ogg", "libopus", OPUS_SAMPLE_RATE, bit_rate=bit_rate, muxer_options={"page_duration": "20000"})


def atempo_factors(speed: float) -> list[float]:
    """Split a tempo change into atempo stages each within [0.5, 2.0].

    Older FFmpeg builds reject atempo outside that range, and newer ones drop whole
    segments above 2.0; chaining keeps every stage a well-behaved time stretch.
    """
    factors: list[float] = []
    remaining = speed
    while remaining > 2.0:
        factors.append(2.0)
        remaining /= 2.0
    while remaining < 0.5:
        factors.append(0.5)
        remaining /= 0.5
    if not factors or abs(remaining - 1.0) > 1e-9:
        factors.append(remaining)
    return [f for f in factors if abs(f - 1.0) > 1e-9]


def validate(response_format: str | FormatSpec, sample_rate: int, speed: float) -> None:
    """Client errors for a format or speed we do not serve; ValueError for a bad engine rate."""
    if not isinstance(response_format, FormatSpec) and response_format not in CONTENT_TYPES:
        raise InvalidRequestError(
            f"response_format must be one of {', '.join(CONTENT_TYPES)}; got {response_format!r}",
            param="response_format",
        )
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequestError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}; got {speed}", param="speed")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
