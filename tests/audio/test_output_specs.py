"""Formats at other rates and bit rates (what ElevenLabs' output_format names stand for), on
both encoder routes, read back by the real FFmpeg: right codec, right rate, mono, and as many
samples as the input's duration at that rate (the resampler keeps the length)."""

from __future__ import annotations

import pytest
from audio_signals import SR, chunked, collect, tone
from decoded_audio import decode_output

from gateway.audio.encoder import encode_audio
from gateway.audio.formats import g711_spec, mp3_spec, opus_spec, pcm_spec, wav_spec

ROUTES = ["inprocess", "ffmpeg"]
CASES = [
    ("pcm_8000", pcm_spec(8000), "pcm_s16le"),
    ("pcm_16000", pcm_spec(16000), "pcm_s16le"),
    ("pcm_22050", pcm_spec(22050), "pcm_s16le"),
    ("pcm_44100", pcm_spec(44100), "pcm_s16le"),
    ("pcm_48000", pcm_spec(48000), "pcm_s16le"),
    ("ulaw_8000", g711_spec("mulaw"), "pcm_mulaw"),
    ("alaw_8000", g711_spec("alaw"), "pcm_alaw"),
    ("wav_16000", wav_spec(16000), "pcm_s16le"),
    ("mp3_22050_32", mp3_spec(22050, 32_000), "mp3"),
    ("mp3_44100_128", mp3_spec(44100, 128_000), "mp3"),
    ("opus_48000_64", opus_spec(64_000), "opus"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("name", "spec", "codec"), CASES, ids=[c[0] for c in CASES])
async def test_each_rate_decodes_at_its_rate_and_length(route: str, name: str, spec, codec: str) -> None:
    seconds = 1.5
    data = await collect(encode_audio(chunked(tone(seconds)), response_format=spec, sample_rate=SR, route=route))
    got = decode_output(data, name)
    assert (got.codec, got.sample_rate, got.channels) == (codec, spec.sample_rate, 1)
    expected = seconds * spec.sample_rate
    if codec.startswith("pcm"):  # raw and WAV: sample-exact but for the resampler's rounding
        assert abs(got.samples - expected) <= 2, (got.samples, expected)
    else:  # codecs pad to whole frames (and Opus/MP3 add priming the decoder trims or not)
        assert expected <= got.samples <= expected + 0.1 * spec.sample_rate, (got.samples, expected)


async def test_g711_is_one_byte_per_sample_and_pcm_two() -> None:
    audio = tone(1.0)
    ulaw = await collect(encode_audio(chunked(audio), response_format=g711_spec("mulaw"), sample_rate=SR))
    pcm16 = await collect(encode_audio(chunked(audio), response_format=pcm_spec(16000), sample_rate=SR))
    assert abs(len(ulaw) - 8000) <= 2
    assert abs(len(pcm16) - 32000) <= 4


async def test_24khz_pcm_spec_takes_the_python_path_byte_for_byte() -> None:
    audio = tone(0.5)
    by_spec = await collect(encode_audio(chunked(audio), response_format=pcm_spec(SR), sample_rate=SR))
    by_name = await collect(encode_audio(chunked(audio), response_format="pcm", sample_rate=SR))
    assert by_spec == by_name
