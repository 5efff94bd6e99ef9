"""Real audio files for voice tests, made by the real FFmpeg."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.audio.ffmpeg_binary import ffmpeg_exe

REPO_VOICES = Path(__file__).resolve().parents[2] / "voices"


def make_audio(path: Path, *, seconds: float, extra: tuple[str, ...] = (), source: str | None = None) -> Path:
    """A 44.1 kHz stereo tone (so tests see resampling and downmixing) in the file's format."""
    lavfi = source or f"sine=frequency=220:sample_rate=44100:duration={seconds}"
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", lavfi,
         "-ac", "2", *extra, str(path)],
        check=True,
    )
    return path


@pytest.fixture
def audio_file(tmp_path: Path) -> Callable[..., Path]:
    folder = tmp_path / "made"
    folder.mkdir()
    return lambda name, seconds=5.0, **kw: make_audio(folder / name, seconds=seconds, **kw)


@pytest.fixture
def builtin_dir(tmp_path: Path) -> Path:
    """A copy of the shipped voices/ folder (tests must not depend on writing the repo)."""
    return Path(shutil.copytree(REPO_VOICES, tmp_path / "builtin"))
