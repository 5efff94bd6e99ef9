"""Decode helpers for audio tests: FFmpeg reads back what we wrote (tests/media_support.py),
strictly: any decoder complaint fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from harness import ffmpeg_children
from media_support import Decoded, decode_file


@pytest.fixture
def decode_audio(tmp_path: Path) -> Callable[[bytes, str], Decoded]:
    return lambda data, fmt: decode_file(data, fmt, tmp_path, strict=True)


@pytest.fixture
def list_ffmpeg_children() -> Callable[[], list[int]]:
    return lambda: sorted(ffmpeg_children())
