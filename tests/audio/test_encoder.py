"""The encoder's contract on every route, against the real FFmpeg decoder: formats, the codec
quirks the module docstring promises, streaming, cancellation, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator

import numpy as np
import pytest
from audio_signals import SR, chunked, collect, endless, tone
from harness import live_encoders

from gateway.audio import formats as formats_mod
from gateway.audio.encoder import (
    CONTENT_TYPES,
    encode_audio,
    float_to_s16le,
    resolve_route,
    wav_stream_header,
)
from gateway.audio.formats import atempo_factors
from gateway.errors import EncoderError, InvalidRequestError

ROUTES = ["inprocess", "ffmpeg"]
EXPECTED = {
    "mp3": ("mp3", 24_000),
    "opus": ("opus", 48_000),
    "aac": ("aac", 24_000),
    "flac": ("flac", 24_000),
    "wav": ("pcm_s16le", 24_000),
    "pcm": ("pcm_s16le", 24_000),
}


def test_content_types_cover_every_format() -> None:
    assert CONTENT_TYPES == {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }


def test_auto_route_is_in_process_when_pyav_imports(monkeypatch) -> None:
    assert resolve_route("auto") == "inprocess"
    monkeypatch.setattr("gateway.audio.encoder.pyav_available", lambda: False)
    assert resolve_route("auto") == "ffmpeg"
    assert resolve_route("inprocess") == "inprocess"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
@pytest.mark.parametrize("speed", [1.0, 0.25, 4.0])
async def test_every_format_decodes_back(route: str, fmt: str, speed: float, decode_audio) -> None:
    seconds = 2.0
    data = await collect(
        encode_audio(chunked(tone(seconds)), response_format=fmt, sample_rate=SR, speed=speed, route=route)
    )
    got = decode_audio(data, fmt)
    assert (got.codec, got.sample_rate, got.channels) == (*EXPECTED[fmt], 1)
    expected = seconds / speed
    # Codec priming/padding adds tens of ms; atempo's windowing trims a little at the edges.
    assert abs(got.duration_s - expected) < 0.03 * expected + 0.1, (got.duration_s, expected)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
async def test_routes_give_the_same_length_of_audio(fmt: str, decode_audio) -> None:
    audio = tone(1.7, 330.0)
    speed = 1.0 if fmt != "wav" else 1.5  # wav at 1.0 takes the Python path on both
    decoded = []
    for route in ROUTES:
        data = await collect(
            encode_audio(chunked(audio, 1234), response_format=fmt, sample_rate=SR, speed=speed, route=route)
        )
        decoded.append(decode_audio(data, fmt))
    assert decoded[0].sample_rate == decoded[1].sample_rate
    assert abs(decoded[0].duration_s - decoded[1].duration_s) < 0.03, decoded


@pytest.mark.parametrize("route", ROUTES)
async def test_codec_quirks_hold(route: str) -> None:
    async def encoded(fmt: str, speed: float = 1.0) -> bytes:
        return await collect(
            encode_audio(chunked(tone(1.0)), response_format=fmt, sample_rate=SR, speed=speed, route=route)
        )

    mp3 = await encoded("mp3")
    assert mp3.startswith(b"ID3") and b"Xing" not in mp3 and b"Info" not in mp3
    # Ogg: the last page carries the end-of-stream flag (header type bit 2), no earlier one does.
    ogg = await encoded("opus")
    pages = [i for i in range(len(ogg)) if ogg.startswith(b"OggS", i)]
    flags = [ogg[i + 5] for i in pages]
    assert flags[-1] & 4 and not any(f & 4 for f in flags[:-1])
    # ADTS: every frame starts with the sync word; the first at byte 0.
    adts = await encoded("aac")
    assert adts[0] == 0xFF and adts[1] & 0xF0 == 0xF0
    # FLAC STREAMINFO (after "fLaC" and a 4-byte block header): total samples and MD5 are 0.
    flac = await encoded("flac")
    info = flac[8:42]
    assert flac.startswith(b"fLaC") and (info[13] & 0x0F) == 0 and info[14:18] == b"\0\0\0\0"
    assert info[18:34] == bytes(16)
    # WAV through a codec route (speed != 1): the same 44-byte streaming header as the Python path.
    wav = await encoded("wav", speed=1.25)
    assert wav[:44] == wav_stream_header()
    assert struct.unpack("<I", wav[40:44])[0] == 0xFFFFFFFF


@pytest.mark.parametrize("route", ROUTES)
async def test_pitch_is_kept_when_tempo_changes(route: str, decode_audio) -> None:
    data = await collect(
        encode_audio(chunked(tone(2.0, 440.0)), response_format="wav", sample_rate=SR, speed=2.0, route=route)
    )
    samples = np.frombuffer(data[44:], dtype="<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * SR / len(samples)
    assert abs(peak_hz - 440.0) < 10.0
    assert abs(decode_audio(data, "wav").duration_s - 1.0) < 0.1


@pytest.mark.parametrize("route", ROUTES)
async def test_input_at_another_sample_rate_is_resampled(route: str, decode_audio) -> None:
    audio = np.zeros(16_000, dtype=np.float32)
    data = await collect(encode_audio(chunked(audio), response_format="pcm", sample_rate=16_000, route=route))
    assert abs(len(data) / 2 / SR - 1.0) < 0.01
    assert decode_audio(data, "pcm").sample_rate == SR


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


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
async def test_first_bytes_leave_before_input_ends(route: str, fmt: str) -> None:
    first_bytes = asyncio.Event()
    speed = 1.0 if fmt != "wav" else 1.25  # wav at 1.25 takes a codec route

    async def source() -> AsyncIterator[np.ndarray]:
        async for chunk in chunked(tone(1.5)):
            yield chunk
        # Hold the input open until output appears: an encoder that only emits at EOF
        # never gets here and times out.
        await asyncio.wait_for(first_bytes.wait(), timeout=10)
        yield tone(0.2)

    parts = []
    async for data in encode_audio(source(), response_format=fmt, sample_rate=SR, speed=speed, route=route):
        first_bytes.set()
        parts.append(data)
    assert len(parts) >= 2


@pytest.mark.parametrize("route", ROUTES)
async def test_consumer_cancellation_cleans_up(route: str) -> None:
    got_bytes = asyncio.Event()

    async def consume() -> None:
        async for _ in encode_audio(endless(pause_s=0.01), response_format="opus", sample_rate=SR, route=route):
            got_bytes.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_bytes.wait(), timeout=10)
    assert live_encoders()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live_encoders() == set()


@pytest.mark.parametrize("route", ROUTES)
async def test_unknown_encoder_raises_encoder_error_and_releases_everything(route: str, monkeypatch) -> None:
    broken = dataclasses.replace(formats_mod.FORMATS["mp3"], codec="no_such_encoder")
    monkeypatch.setitem(formats_mod.FORMATS, "mp3", broken)
    input_closed = False

    async def source() -> AsyncIterator[np.ndarray]:
        nonlocal input_closed
        try:
            for _ in range(100):
                yield tone(0.1)
        finally:
            input_closed = True

    with pytest.raises(EncoderError, match="no_such_encoder"):
        await collect(encode_audio(source(), response_format="mp3", sample_rate=SR, route=route))
    assert input_closed
    assert live_encoders() == set()


@pytest.mark.parametrize("route", ROUTES)
async def test_input_error_propagates_and_the_encoder_is_released(route: str) -> None:
    class EngineBroke(RuntimeError):
        pass

    async def source() -> AsyncIterator[np.ndarray]:
        yield tone(0.5)
        raise EngineBroke("mid-stream failure")

    with pytest.raises(EngineBroke):
        await collect(encode_audio(source(), response_format="aac", sample_rate=SR, route=route))
    assert live_encoders() == set()


async def test_input_is_closed_when_python_path_output_closes() -> None:
    closed = asyncio.Event()
    out = encode_audio(endless(closed), response_format="pcm", sample_rate=SR)
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
