"""Decode helpers for audio tests: the real ffprobe/FFmpeg read back what we wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import ffmpeg_children


@dataclass(frozen=True)
class Decoded:
    codec: str
    sample_rate: int
    channels: int
    duration_s: float
    """Measured by decoding every sample, not from container metadata."""


def _raw_args(fmt: str) -> list[str]:
    # Headerless PCM carries no format: tell the decoder what it is.
    return ["-f", "s16le", "-ar", "24000", "-ac", "1"] if fmt == "pcm" else []


def decode(data: bytes, fmt: str, tmp_path: Path) -> Decoded:
    ffprobe = shutil.which("ffprobe")
    assert ffprobe, "ffprobe is required (apt-get install ffmpeg)"
    path = tmp_path / f"out.{fmt}"
    path.write_bytes(data)
    probe = subprocess.run(
        [ffprobe, "-v", "error", *_raw_args(fmt), "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    streams = json.loads(probe.stdout)["streams"]
    assert len(streams) == 1, streams
    stream = streams[0]
    # Decode the whole file; any corruption (a second header, a broken page) shows on stderr.
    dec = subprocess.run(
        [shutil.which("ffmpeg") or "ffmpeg", "-v", "error", *_raw_args(fmt), "-i", str(path), "-f", "f32le", "-"],
        capture_output=True, check=True,
    )
    assert dec.stderr == b"", dec.stderr.decode()
    sample_rate = int(stream["sample_rate"])
    channels = int(stream["channels"])
    return Decoded(stream["codec_name"], sample_rate, channels, len(dec.stdout) / 4 / channels / sample_rate)


@pytest.fixture
def decode_audio(tmp_path: Path) -> Callable[[bytes, str], Decoded]:
    return lambda data, fmt: decode(data, fmt, tmp_path)


@pytest.fixture
def list_ffmpeg_children() -> Callable[[], list[int]]:
    return lambda: sorted(ffmpeg_children())
