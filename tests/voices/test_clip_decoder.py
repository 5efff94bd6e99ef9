"""Clips crafted to fool a text-matching probe or to make the decoder expand a few kilobytes
into hundreds of megabytes: tags that spell a stream line, a FLAC whose frames switch to
16 Hz after a 24 kHz header, truncated headers, and headers that declare huge lengths. Each
is made with the real FFmpeg (then patched where FFmpeg would not write it) and sent through
the real decoding child; each must be a 400 naming ``audio_sample``, quickly, or be read for
what it really is."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.engine.fake import FakeEngine
from gateway.errors import InvalidRequestError
from gateway.settings import Settings
from gateway.voices import clip_decoder
from gateway.voices.clip_probe import DecodeLimits, decode_clip
from gateway.voices.library import VoiceLibrary
from harness import in_process
from ops_support import cpu_s

FAKE_STREAM_LINE = "Stream #0:0: Audio: pcm_s16le, 24000 Hz, mono, s16, 384 kb/s"


def ffmpeg(*args: str, source: str | None = None) -> bytes:
    """Run the real FFmpeg; its stdout (the file, when the output is ``pipe:1``)."""
    inputs = ["-f", "lavfi", "-i", source] if source else []
    return subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *inputs, *args],
        capture_output=True, check=True,
    ).stdout


def sine(seconds: float, rate: int) -> str:
    return f"sine=frequency=220:duration={seconds}:sample_rate={rate}"


def flac_frames(data: bytes) -> tuple[bytes, bytes]:
    """A FLAC file as (``fLaC`` + STREAMINFO marked as the last metadata block, the frames):
    the other metadata blocks (padding, tags) dropped."""
    assert data[:4] == b"fLaC"
    pos, streaminfo = 4, b""
    while True:
        last, kind, length = data[pos] & 0x80, data[pos] & 0x7F, int.from_bytes(data[pos + 1 : pos + 4], "big")
        if kind == 0:
            streaminfo = bytes([0x80]) + data[pos + 1 : pos + 4 + length]
        pos += 4 + length
        if last:
            return b"fLaC" + streaminfo, data[pos:]


def flac_rate_switch(later_rate: int, later_s: float) -> bytes:
    """A FLAC whose header and first frames say 24 kHz and whose later frames say
    ``later_rate`` (each FLAC frame header carries its own rate): the frames of a second
    stream (``later_s`` seconds of a constant), encoded by FFmpeg at that rate in the same
    sample format, appended."""
    head, first = flac_frames(ffmpeg("-sample_fmt", "s16", "-f", "flac", "pipe:1", source=sine(0.1, 24_000)))
    _, later = flac_frames(
        ffmpeg("-sample_fmt", "s16", "-f", "flac", "pipe:1", source=f"aevalsrc=0.25:d={later_s}:s={later_rate}")
    )
    return head + first + later


def wav_with_title(rate: int, title: str) -> bytes:
    """A WAV at ``rate`` Hz holding a LIST/INFO title tag (FFmpeg prints it above the stream)."""
    samples = b"\x10\x20" * 4096
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    text = title.encode() + b"\x00"
    text += b"\x00" * (len(text) % 2)
    info = b"INFO" + b"INAM" + struct.pack("<I", len(text)) + text
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", len(info)) + info
    chunks += b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def banner(data: bytes, container: str) -> str:
    """What the FFmpeg command line prints about an input (what the old probe matched)."""
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-f", container, "-i", "pipe:0"], input=data, capture_output=True
    )
    return proc.stderr.decode("utf-8", "replace")


@pytest.fixture
def library(builtin_dir: Path, tmp_path: Path) -> VoiceLibrary:
    return VoiceLibrary(builtin_dir, tmp_path / "user", decode_limits=DecodeLimits(memory_bytes=256 * 1_048_576))


def refused(library: VoiceLibrary, data: bytes) -> InvalidRequestError:
    started = cpu_s()
    with pytest.raises(InvalidRequestError) as caught:
        library.create("crafted", data)
    assert caught.value.param == "audio_sample" and caught.value.status_code == 400
    assert cpu_s() - started < 5.0  # CPU, not wall: a stalled host is no bomb
    assert list((library.user_dir / "created").iterdir()) == []
    return caught.value


def test_a_tag_that_spells_a_stream_line_is_only_a_tag(library: VoiceLibrary) -> None:
    data = wav_with_title(2, FAKE_STREAM_LINE)
    # the attack as filed: FFmpeg's report shows the tag's "24000 Hz" before the real stream line
    text = banner(data, "wav")
    real = re.search(r"Stream #0:0: Audio: pcm_s16le[^\n]*, 2 Hz", text)
    assert real is not None and text.index(FAKE_STREAM_LINE) < real.start(), text
    assert "sample rate of 2 Hz" in refused(library, data).message


def test_a_flac_tag_that_spells_a_stream_line_is_only_a_tag(library: VoiceLibrary) -> None:
    # 4 kHz: below the 8 kHz accepted, in the STREAMINFO and in every frame header
    data = ffmpeg("-metadata", f"title={FAKE_STREAM_LINE}", "-f", "flac", "pipe:1", source=sine(5, 4000))
    text = banner(data, "flac")
    assert text.index(FAKE_STREAM_LINE) < text.index("Audio: flac, 4000 Hz"), text
    assert "sample rate of 4000 Hz" in refused(library, data).message


@pytest.mark.parametrize(("later_rate", "later_s"), [(16, 4000), (8000, 20)])
def test_a_flac_that_switches_rate_mid_stream_is_refused(library: VoiceLibrary, later_rate: int, later_s: float) -> None:
    data = flac_rate_switch(later_rate, later_s)
    assert len(data) < 20_000
    # the frames really say what the test means: 24 kHz first, ``later_rate`` after
    import av

    with av.open(io.BytesIO(data), format="flac") as container:
        assert container.streams.audio[0].codec_context.sample_rate == 24_000
        rates = {frame.sample_rate for frame in container.decode(audio=0)}
    assert rates == {24_000, later_rate}
    # refused by the child for what it is, not killed at its memory cap (256 MiB here)
    message = refused(library, data).message
    assert f"to {later_rate} Hz" in message and "mid-stream" in message, message


async def test_the_rate_switch_is_refused_over_http(settings: Settings, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        response = await gw.http.post(
            "/v1/audio/voices",
            data={"name": "switcher"},
            files={"audio_sample": ("clip.flac", flac_rate_switch(16, 4000), "audio/flac")},
        )
        error = api_error(response, 400, code="invalid_audio")
        assert error["param"] == "audio_sample" and "mid-stream" in error["message"]
        listed = (await gw.http.get("/v1/audio/voices")).json()["data"]
        assert "switcher" not in {v["name"] for v in listed}


TRUNCATED_SOURCES = {
    "wav": ("-f", "wav"),
    "flac": ("-f", "flac"),
    "mp3": ("-f", "mp3"),
    "ogg": ("-c:a", "libopus", "-f", "ogg"),
    "mov": ("-c:a", "aac", "-f", "mp4"),
    "aiff": ("-f", "aiff"),
}


@pytest.mark.parametrize("container", sorted(TRUNCATED_SOURCES))
def test_truncated_headers_are_400s(library: VoiceLibrary, container: str, tmp_path: Path) -> None:
    out = tmp_path / f"whole.{container}"
    args = TRUNCATED_SOURCES[container]
    ffmpeg(*args, str(out), source=sine(5, 24_000))
    whole = out.read_bytes()
    for cut in (8, 30, 60, 200):
        message = refused(library, whole[:cut]).message
        assert "audio_sample" in message, (container, cut, message)


def test_a_wav_that_declares_gigabytes_is_read_for_what_it_holds(library: VoiceLibrary) -> None:
    data = bytearray(ffmpeg("-f", "wav", "pipe:1", source=sine(5, 24_000)))
    at = data.index(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 0x7FFF_FFF0)
    data[4:8] = struct.pack("<I", 0x7FFF_FFF0)
    voice = library.create("declared", bytes(data))
    assert voice.clip is not None and voice.clip.stat().st_size < 500_000


def test_a_flac_that_declares_hours_is_refused_from_its_header(library: VoiceLibrary) -> None:
    data = bytearray(ffmpeg("-f", "flac", "pipe:1", source=sine(5, 24_000)))
    # STREAMINFO's 36-bit total sample count (the low 4 bits of byte 21, then bytes 22-25)
    data[21] |= 0x0F
    data[22:26] = b"\xff\xff\xff\xff"
    message = refused(library, bytes(data)).message
    assert "s long; the limit is 30 s" in message, message


def test_a_long_clip_is_cut_off_at_the_limit_not_decoded_whole(library: VoiceLibrary) -> None:
    # two minutes of Opus in Matroska written to a pipe: no length anywhere to refuse it by
    data = ffmpeg("-c:a", "libopus", "-f", "matroska", "pipe:1", source=sine(120, 48_000))
    bounds = {"format": "matroska", "max_seconds": 30, "min_rate": 8000, "max_rate": 192_000, "max_channels": 8}
    out = io.BytesIO()
    with pytest.raises(clip_decoder.Refused, match="longer than 30 s"):
        clip_decoder.decode(data, bounds, out)
    assert len(out.getvalue()) / 4 / clip_decoder.OUTPUT_RATE < 30 + clip_decoder.DURATION_SLACK_S
    assert "longer than 30 s" in refused(library, data).message


def test_decoded_samples_are_bounded_by_the_bytes_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child refuses a stream that decodes to more samples than its codec could code in
    the bytes given (shown with the FLAC bound lowered below what a plain tone needs); the
    real bounds hold for what FFmpeg's encoders make of digital silence, the most compact
    audio there is."""
    tone = ffmpeg("-f", "flac", "pipe:1", source=sine(3, 24_000))
    bounds = {"format": "flac", "max_seconds": 30, "min_rate": 8000, "max_rate": 192_000, "max_channels": 8}
    monkeypatch.setitem(clip_decoder.MAX_SAMPLES_PER_BYTE, "flac", 1.0)
    with pytest.raises(clip_decoder.Refused, match="more audio than"):
        clip_decoder.decode(tone, bounds, io.BytesIO())
    monkeypatch.undo()
    for codec, container in (("flac", "flac"), ("libopus", "ogg"), ("aac", "adts"), ("libmp3lame", "mp3")):
        data = ffmpeg("-t", "30", "-c:a", codec, "-f", container, "pipe:1", source="anullsrc=r=48000:cl=mono")
        name = {"libopus": "opus", "libmp3lame": "mp3float", "adts": "aac"}.get(codec, codec)
        assert 48_000 * 30 / len(data) < clip_decoder.samples_per_byte(name) / 4, codec


def test_an_honest_clip_still_decodes_to_24k_mono(library: VoiceLibrary) -> None:
    samples = decode_clip(
        ffmpeg("-ac", "2", "-f", "wav", "pipe:1", source=sine(4, 44_100)), "wav", DecodeLimits(), max_seconds=30
    )
    assert abs(len(samples) - 4 * 24_000) <= 1
    assert 0.1 < float(abs(samples).max()) <= 1.0  # the sine source's amplitude is 1/8
