"""The encoder against the real FFmpeg: formats, streaming, cancellation, failures."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator

import numpy as np
import pytest

from gateway.audio import encoder as encoder_mod
from gateway.audio.encoder import (
    CONTENT_TYPES,
    atempo_factors,
    build_command,
    encode_audio,
    float_to_s16le,
    wav_stream_header,
)
from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.errors import EncoderError, InvalidRequestError

SR = 24_000
EXPECTED = {
    "mp3": ("mp3", 24_000),
    "opus": ("opus", 48_000),
    "aac": ("aac", 24_000),
    "flac": ("flac", 24_000),
    "wav": ("pcm_s16le", 24_000),
    "pcm": ("pcm_s16le", 24_000),
}


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def chunked(audio: np.ndarray, size: int = 2400) -> AsyncIterator[np.ndarray]:
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([b async for b in it])


def test_content_types_cover_every_format() -> None:
    assert CONTENT_TYPES == {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }


@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
@pytest.mark.parametrize("speed", [1.0, 0.25, 4.0])
async def test_every_format_decodes_back(fmt: str, speed: float, decode_audio) -> None:
    seconds = 2.0
    data = await collect(encode_audio(chunked(tone(seconds)), response_format=fmt, sample_rate=SR, speed=speed))
    got = decode_audio(data, fmt)
    assert (got.codec, got.sample_rate, got.channels) == (*EXPECTED[fmt], 1)
    expected = seconds / speed
    # Codec priming/padding adds tens of ms; atempo's windowing trims a little at the edges.
    assert abs(got.duration_s - expected) < 0.03 * expected + 0.1, (got.duration_s, expected)


async def test_pitch_is_kept_when_tempo_changes(decode_audio) -> None:
    data = await collect(encode_audio(chunked(tone(2.0, 440.0)), response_format="wav", sample_rate=SR, speed=2.0))
    samples = np.frombuffer(data[44:], dtype="<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * SR / len(samples)
    assert abs(peak_hz - 440.0) < 10.0
    assert abs(decode_audio(data, "wav").duration_s - 1.0) < 0.1


async def test_input_at_another_sample_rate_is_resampled(decode_audio) -> None:
    audio = np.zeros(16_000, dtype=np.float32)
    data = await collect(encode_audio(chunked(audio), response_format="pcm", sample_rate=16_000))
    assert abs(len(data) / 2 / SR - 1.0) < 0.01
    assert decode_audio(data, "pcm").sample_rate == SR


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


def test_float_to_s16le_clips_and_rounds() -> None:
    out = np.frombuffer(float_to_s16le(np.array([2.0, -2.0, 1.0, -1.0, 0.0, np.nan], np.float32)), "<i2")
    assert out.tolist() == [32767, -32768, 32767, -32768, 0, 0]


@pytest.mark.parametrize(
    ("speed", "factors"),
    [(1.0, []), (0.25, [0.5, 0.5]), (4.0, [2.0, 2.0]), (1.5, [1.5]), (3.0, [2.0, 1.5]), (0.3, [0.5, 0.6])],
)
def test_atempo_chain_stays_in_range(speed: float, factors: list[float]) -> None:
    got = atempo_factors(speed)
    assert got == pytest.approx(factors)
    assert all(0.5 <= f <= 2.0 for f in got)
    assert float(np.prod(got)) == pytest.approx(speed)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
async def test_first_bytes_leave_before_input_ends(fmt: str) -> None:
    first_bytes = asyncio.Event()
    speed = 1.0 if fmt != "wav" else 1.25  # wav at 1.25 takes the FFmpeg path

    async def source() -> AsyncIterator[np.ndarray]:
        async for chunk in chunked(tone(1.5)):
            yield chunk
        # Hold the input open until output appears: an encoder that only emits at EOF
        # never gets here and times out.
        await asyncio.wait_for(first_bytes.wait(), timeout=10)
        yield tone(0.2)

    parts = []
    async for data in encode_audio(source(), response_format=fmt, sample_rate=SR, speed=speed):
        first_bytes.set()
        parts.append(data)
    assert len(parts) >= 2


async def test_early_close_kills_and_reaps_ffmpeg_and_closes_input(list_ffmpeg_children) -> None:
    input_closed = asyncio.Event()

    async def endless() -> AsyncIterator[np.ndarray]:
        try:
            while True:
                yield tone(0.1)
                await asyncio.sleep(0)
        finally:
            input_closed.set()

    assert list_ffmpeg_children() == []
    out = encode_audio(endless(), response_format="mp3", sample_rate=SR)
    first = await out.__anext__()
    assert first
    running = list_ffmpeg_children()
    assert len(running) == 1
    await out.aclose()
    assert input_closed.is_set()
    assert list_ffmpeg_children() == []  # killed and reaped: not even a zombie remains


async def test_consumer_cancellation_cleans_up(list_ffmpeg_children) -> None:
    async def endless() -> AsyncIterator[np.ndarray]:
        while True:
            yield tone(0.1)
            await asyncio.sleep(0.01)

    got_bytes = asyncio.Event()

    async def consume() -> None:
        async for _ in encode_audio(endless(), response_format="opus", sample_rate=SR):
            got_bytes.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_bytes.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list_ffmpeg_children() == []


async def test_ffmpeg_failure_raises_encoder_error(monkeypatch, list_ffmpeg_children) -> None:
    broken = encoder_mod._Codec({"format": "mp3", "acodec": "no_such_encoder"}, SR)
    monkeypatch.setitem(encoder_mod._CODECS, "mp3", broken)
    input_closed = False

    async def source() -> AsyncIterator[np.ndarray]:
        nonlocal input_closed
        try:
            for _ in range(100):
                yield tone(0.1)
        finally:
            input_closed = True

    with pytest.raises(EncoderError, match="no_such_encoder") as info:
        await collect(encode_audio(source(), response_format="mp3", sample_rate=SR))
    assert "FFmpeg exited with status" in info.value.message
    assert input_closed
    assert list_ffmpeg_children() == []


async def test_input_error_propagates_and_ffmpeg_is_reaped(list_ffmpeg_children) -> None:
    class EngineBroke(RuntimeError):
        pass

    async def source() -> AsyncIterator[np.ndarray]:
        yield tone(0.5)
        raise EngineBroke("mid-stream failure")

    with pytest.raises(EngineBroke):
        await collect(encode_audio(source(), response_format="aac", sample_rate=SR))
    assert list_ffmpeg_children() == []


async def test_input_is_closed_when_python_path_output_closes() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[np.ndarray]:
        try:
            while True:
                yield tone(0.1)
        finally:
            closed.set()

    out = encode_audio(endless(), response_format="pcm", sample_rate=SR)
    assert await out.__anext__()
    await out.aclose()
    assert closed.is_set()


async def test_bad_format_and_speed_are_client_errors() -> None:
    with pytest.raises(InvalidRequestError) as fmt_err:
        await collect(encode_audio(chunked(tone(0.1)), response_format="ogg", sample_rate=SR))
    assert fmt_err.value.param == "response_format"
    for speed in (0.2, 4.5):
        with pytest.raises(InvalidRequestError) as speed_err:
            await collect(encode_audio(chunked(tone(0.1)), response_format="mp3", sample_rate=SR, speed=speed))
        assert speed_err.value.param == "speed"


async def test_imageio_ffmpeg_fallback_encodes(monkeypatch, decode_audio) -> None:
    import imageio_ffmpeg

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    ffmpeg_exe.cache_clear()
    try:
        assert ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
        data = await collect(encode_audio(chunked(tone(1.0)), response_format="opus", sample_rate=SR))
    finally:
        monkeypatch.undo()
        ffmpeg_exe.cache_clear()
    got = decode_audio(data, "opus")
    assert (got.codec, got.sample_rate) == ("opus", 48_000)
