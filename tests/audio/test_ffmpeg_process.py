"""The FFmpeg-process route's own guarantees: the child is killed and reaped, the Python
pcm/wav path matches FFmpeg byte for byte, the wheel's static binary is preferred and the
system's is the fallback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import numpy as np
import pytest
from audio_signals import SR, chunked, collect, endless, tone

from gateway.audio import formats as formats_mod
from gateway.audio.encoder import encode_audio, wav_stream_header
from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.audio.ffmpeg_process import build_command, encode_with_ffmpeg
from gateway.errors import EncoderError


@pytest.mark.parametrize("fmt", ["pcm", "wav"])
async def test_python_fast_path_is_byte_identical_to_ffmpeg(fmt: str) -> None:
    audio = np.concatenate([tone(0.5), np.array([1.5, -1.5, 0.99999, -1.0, 0.5 / 32768, np.nan], dtype=np.float32)])
    ours = await collect(encode_audio(chunked(audio, 1000), response_format=fmt, sample_rate=SR))
    theirs = subprocess.run(
        build_command(response_format=fmt, sample_rate=SR, speed=1.0),
        input=np.nan_to_num(audio).tobytes(), capture_output=True, check=True,
    ).stdout
    assert ours == theirs
    if fmt == "wav":
        assert ours[:44] == wav_stream_header()
        assert ours[4:8] == b"\xff\xff\xff\xff" and ours[40:44] == b"\xff\xff\xff\xff"


async def test_early_close_kills_and_reaps_ffmpeg_and_closes_input(list_ffmpeg_children) -> None:
    input_closed = asyncio.Event()
    assert list_ffmpeg_children() == []
    out = encode_audio(endless(input_closed), response_format="mp3", sample_rate=SR, route="ffmpeg")
    first = await out.__anext__()
    assert first
    running = list_ffmpeg_children()
    assert len(running) == 1
    await out.aclose()
    assert input_closed.is_set()
    assert list_ffmpeg_children() == []  # killed and reaped: not even a zombie remains


async def test_ffmpeg_failure_names_the_exit_status(monkeypatch, list_ffmpeg_children) -> None:
    broken = formats_mod.FormatSpec("mp3", "no_such_encoder", SR)
    monkeypatch.setitem(formats_mod.FORMATS, "mp3", broken)
    with pytest.raises(EncoderError, match="FFmpeg exited with status"):
        await collect(encode_audio(chunked(tone(1.0)), response_format="mp3", sample_rate=SR, route="ffmpeg"))
    assert list_ffmpeg_children() == []


def test_the_wheels_static_ffmpeg_is_preferred() -> None:
    import imageio_ffmpeg

    ffmpeg_exe.cache_clear()
    try:
        assert ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
    finally:
        ffmpeg_exe.cache_clear()


async def test_system_ffmpeg_is_the_fallback(monkeypatch, decode_audio, tmp_path) -> None:
    import imageio_ffmpeg

    def no_binary() -> str:
        raise RuntimeError("no ffmpeg binary for this platform")

    # "the system's" is whatever `ffmpeg` PATH finds: here a link to the wheel's binary, first
    # on PATH, so this runs where no FFmpeg is installed
    system = tmp_path / "bin" / "ffmpeg"
    system.parent.mkdir()
    system.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setenv("PATH", f"{system.parent}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    ffmpeg_exe.cache_clear()
    try:
        assert ffmpeg_exe() == str(system)
        data = await collect(encode_audio(chunked(tone(1.0)), response_format="opus", sample_rate=SR, route="ffmpeg"))
    finally:
        monkeypatch.undo()
        ffmpeg_exe.cache_clear()
    got = decode_audio(data, "opus")
    assert (got.codec, got.sample_rate) == ("opus", 48_000)


async def test_a_given_binary_is_the_one_run(decode_audio) -> None:
    import imageio_ffmpeg

    for exe in filter(None, (shutil.which("ffmpeg"), imageio_ffmpeg.get_ffmpeg_exe())):  # the system's where there is one
        assert build_command(response_format="mp3", sample_rate=SR, speed=1.0, exe=exe)[0] == exe
        data = await collect(encode_with_ffmpeg(chunked(tone(1.0)), response_format="aac", sample_rate=SR, speed=1.0, exe=exe))
        assert decode_audio(data, "aac").codec == "aac"
