"""Decode any output we serve with the real FFmpeg, as a client would: codec, rate, channels
and the exact number of samples. Headerless formats (raw PCM at any rate, G.711 mu-law/A-law)
carry no description, so the caller says what they are, as a client must."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    ``opus_48000_64``, ``wav_22050``) decoded by ffprobe + FFmpeg; fails on any decoder error."""
    assert data, "no audio bytes"
    codec, rate = output_format.split("_")[:2]
    raw = ["-f", _RAW[codec], "-ar", rate, "-ac", "1"] if codec in _RAW else []
    ffprobe, ffmpeg = shutil.which("ffprobe"), shutil.which("ffmpeg")
    assert ffprobe and ffmpeg, "ffprobe and ffmpeg are required (apt-get install ffmpeg)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"audio.{codec}"
        path.write_bytes(data)
        probe = subprocess.run(
            [ffprobe, "-v", "error", *raw, "-show_streams", "-of", "json", str(path)], capture_output=True, text=True, check=True
        )
        (stream,) = json.loads(probe.stdout)["streams"]
        decoded = subprocess.run([ffmpeg, "-v", "error", *raw, "-i", str(path), "-f", "s16le", "-"], capture_output=True, check=True)
    assert decoded.stderr == b"", decoded.stderr.decode()
    channels = int(stream["channels"])
    return DecodedAudio(stream["codec_name"], int(stream["sample_rate"]), channels, len(decoded.stdout) // 2 // channels)
