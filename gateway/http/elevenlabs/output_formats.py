"""ElevenLabs' ``output_format`` names -> what the encoder makes.

``<codec>_<sample rate>[_<kbit/s>]``, resampled from the engine's 24 kHz by the encoder
(``gateway.audio.formats``):

- ``pcm_<rate>``: raw s16le mono, any rate from 8000 to 48000 (ElevenLabs lists 8000, 16000,
  22050, 24000, 32000, 44100, 48000); ``pcm_24000`` needs no resampling and no codec;
- ``ulaw_8000``, ``alaw_8000``: raw G.711, one byte per sample (telephony);
- ``mp3_<rate>_<kbps>``: MPEG Layer III at an MP3 rate (8000-48000) and 8-320 kbit/s
  (ElevenLabs: ``mp3_22050_32`` ... ``mp3_44100_192``; default ``mp3_44100_128``);
- ``opus_48000_<kbps>``: Ogg Opus at 6-510 kbit/s (ElevenLabs: 32, 64, 96, 128, 192);
- ``wav_<rate>``: streamed WAV (s16le mono), 8000-48000.

Anything else is a 400 naming ``output_format``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.audio.formats import (
    MAX_PCM_SAMPLE_RATE,
    MIN_PCM_SAMPLE_RATE,
    MP3_SAMPLE_RATES,
    FormatSpec,
    g711_spec,
    mp3_spec,
    opus_spec,
    pcm_spec,
    wav_spec,
)
from gateway.errors import InvalidRequestError

DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"
"""ElevenLabs' default."""

_NAME = re.compile(r"(pcm|ulaw|alaw|mp3|opus|wav)_(\d{4,6})(?:_(\d{1,3}))?")
_MP3_KBPS = (8, 320)
_OPUS_KBPS = (6, 510)
_MEDIA_TYPES = {
    "pcm": "audio/pcm",
    "ulaw": "audio/basic",
    "alaw": "audio/x-alaw-basic",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "wav": "audio/wav",
}


@dataclass(frozen=True, slots=True)
class OutputFormat:
    name: str
    spec: FormatSpec
    media_type: str

    @property
    def codec(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    @property
    def bytes_per_second(self) -> int | None:
        """For the raw formats: bytes of one second of audio (None for compressed ones)."""
        if self.codec == "pcm":
            return 2 * self.spec.sample_rate
        if self.codec in ("ulaw", "alaw"):
            return self.spec.sample_rate
        return None


def parse_output_format(name: str | None) -> OutputFormat:
    """The format an ElevenLabs name stands for; InvalidRequestError (param ``output_format``)."""
    name = DEFAULT_OUTPUT_FORMAT if name is None else name.strip().lower()
    match = _NAME.fullmatch(name)
    if match is None:
        raise _invalid(name)
    codec, rate, kbps = match.group(1), int(match.group(2)), match.group(3)
    spec = _spec(codec, rate, None if kbps is None else int(kbps))
    if spec is None:
        raise _invalid(name)
    return OutputFormat(name=name, spec=spec, media_type=_MEDIA_TYPES[codec])


def _spec(codec: str, rate: int, kbps: int | None) -> FormatSpec | None:
    pcm_rate = MIN_PCM_SAMPLE_RATE <= rate <= MAX_PCM_SAMPLE_RATE
    if codec == "pcm" and kbps is None and pcm_rate:
        return pcm_spec(rate)
    if codec == "wav" and kbps is None and pcm_rate:
        return wav_spec(rate)
    if codec in ("ulaw", "alaw") and kbps is None and rate == 8000:
        return g711_spec("mulaw" if codec == "ulaw" else "alaw", rate)
    if codec == "mp3" and kbps is not None and rate in MP3_SAMPLE_RATES and _MP3_KBPS[0] <= kbps <= _MP3_KBPS[1]:
        return mp3_spec(rate, kbps * 1000)
    if codec == "opus" and kbps is not None and rate == 48000 and _OPUS_KBPS[0] <= kbps <= _OPUS_KBPS[1]:
        return opus_spec(kbps * 1000)
    return None


def _invalid(name: str) -> InvalidRequestError:
    shown = name if len(name) <= 40 else name[:40] + "..."
    return InvalidRequestError(
        f"Unknown output_format '{shown}'. Use pcm_<8000-48000>, ulaw_8000, alaw_8000, wav_<8000-48000>, "
        f"mp3_<rate>_<8-320 kbps> (e.g. {DEFAULT_OUTPUT_FORMAT}) or opus_48000_<6-510 kbps>.",
        param="output_format",
        code="invalid_output_format",
    )
