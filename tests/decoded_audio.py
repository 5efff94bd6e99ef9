"""Decode any output we serve with the real FFmpeg, as a client would: codec, rate, channels
and the exact number of samples. Headerless formats (raw PCM at any rate, G.711 mu-law/A-law)
carry no description, so the caller says what they are, as a client must.

Only what the install brings (tests/media_support.py): FFmpeg's demuxers in process through
PyAV where ffprobe would be used, and the FFmpeg binary the gateway runs for the samples."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av

from gateway.audio.ffmpeg_binary import ffmpeg_exe

_RAW = {"pcm": "s16le", "ulaw": "mulaw", "alaw": "alaw"}


@dataclass(frozen=True)
class DecodedAudio:
    codec: str
    sample_rate: int
    channels: int
    samples: int
    """Counted by decoding every sample (at the stream's own rate)."""

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate


def decode_output(data: bytes, output_format: str) -> DecodedAudio:
    """``data`` as an ElevenLabs ``output_format`` (``pcm_16000``, ``ulaw_8000``, ``mp3_44100_128``,
    ``opus_48000_64``, ``wav_22050``) decoded by FFmpeg; fails on any decoder error."""
    assert data, "no audio bytes"
    codec, rate = output_format.split("_")[:2]
    raw = ["-f", _RAW[codec], "-ar", rate, "-ac", "1"] if codec in _RAW else []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"audio.{codec}"
        path.write_bytes(data)
        options = {"sample_rate": rate, "ch_layout": "mono"} if codec in _RAW else {}
        with av.open(str(path), format=_RAW.get(codec), options=options) as container:  # what ffprobe reads
            (stream,) = container.streams.audio
            context = stream.codec_context
            name, sample_rate, channels = context.codec.canonical_name, context.sample_rate, context.layout.nb_channels
        decoded = subprocess.run([ffmpeg_exe(), "-v", "error", *raw, "-i", str(path), "-f", "s16le", "-"],
                                 capture_output=True, check=True)
    assert decoded.stderr == b"", decoded.stderr.decode()
    return DecodedAudio(name, sample_rate, channels, len(decoded.stdout) // 2 // channels)
