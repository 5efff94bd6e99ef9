"""A voice clip as the engines read it (gateway/engine/checkpoint/components.py::load_clip), in
every format a voices folder accepts, with only what the install brings: libsndfile's formats
the way upstream reads them, the rest through FFmpeg's libraries in the bounded decoding child,
never librosa's audioread fallback (it needs a system FFmpeg and is deprecated)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.engine.checkpoint import components
from gateway.engine.checkpoint.components import MAX_CLIP_SECONDS, load_clip
from gateway.errors import InvalidRequestError
from gateway.voices.library import CLIP_EXTENSIONS

FORMATS = {  # name -> FFmpeg options (the tone is 44.1 kHz stereo: resampled and downmixed here)
    "a.wav": (), "a.flac": (), "a.mp3": (), "a.ogg": ("-c:a", "libvorbis"), "a.opus": ("-c:a", "libopus"),
    "a.m4a": ("-c:a", "aac"), "a.aac": ("-c:a", "aac"), "a.mp4": ("-c:a", "aac"), "a.webm": ("-c:a", "libopus"),
    "a.aiff": (),
}


@contextlib.contextmanager
def _no_audioread() -> Iterator[None]:
    """librosa's fallback announces itself: "PySoundFile failed. Trying audioread instead." and
    a deprecation of its audioread loader. Either fails the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PySoundFile failed")
        warnings.filterwarnings("error", message=".*audioread_load", category=FutureWarning)
        yield


def test_every_accepted_extension_is_covered() -> None:
    assert {Path(name).suffix for name in FORMATS} | {".oga", ".aif"} == set(CLIP_EXTENSIONS)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_folder_format_loads_at_24khz_mono_without_audioread(name: str, audio_file) -> None:
    path = audio_file(name, seconds=3.0, extra=FORMATS[name])
    with _no_audioread():
        wav = load_clip(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size / 24000 - 3.0) < 0.1, wav.size / 24000  # codec padding is a few ms
    spectrum = np.abs(np.fft.rfft(wav[2400:-2400]))
    peak_hz = np.argmax(spectrum) * 24000 / (wav.size - 4800)
    assert abs(peak_hz - 220) < 3  # the tone, at its pitch: resampled right


def test_a_long_clip_is_cut_and_a_short_or_broken_one_refused(audio_file, tmp_path: Path, monkeypatch) -> None:
    long = load_clip(audio_file("long.m4a", seconds=MAX_CLIP_SECONDS + 5, extra=("-c:a", "aac")))
    assert long.size <= int(MAX_CLIP_SECONDS * 24000)
    with pytest.raises(InvalidRequestError, match="at least") as short:
        load_clip(audio_file("short.webm", seconds=1.0, extra=("-c:a", "libopus")))
    assert short.value.param == "voice"
    garbage = tmp_path / "garbage.m4a"
    garbage.write_bytes(b"not audio at all")
    with _no_audioread(), pytest.raises(InvalidRequestError, match="cannot be decoded"):
        load_clip(garbage)
    truncated = tmp_path / "truncated.m4a"
    truncated.write_bytes(audio_file("whole.m4a", seconds=3.0, extra=("-c:a", "aac")).read_bytes()[:2000])
    with pytest.raises(InvalidRequestError, match="cannot be decoded") as broken:
        load_clip(truncated)
    assert broken.value.param == "voice"
    monkeypatch.setattr(components, "MAX_CLIP_FILE_BYTES", 1000)
    with pytest.raises(InvalidRequestError, match="MiB"):
        load_clip(audio_file("big.m4a", seconds=3.0, extra=("-c:a", "aac")))
