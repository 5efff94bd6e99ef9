"""Uploads built to hurt: a few kilobytes whose header asks the decoder for gigabytes (1 Hz
sample rates in WAV, FLAC, AIFF and Matroska; hundreds of channels), refused from the header
before any decoding; the decoding child itself bounded by limits the OS enforces; cheap refusals
(taken name, voice count, consent size) before the clip is decoded; and the voice index not
rebuilt per lookup."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.errors import ConflictError, InvalidRequestError
from gateway.voices.clip_probe import DecodeLimits, decode_clip
from gateway.voices.library import VoiceLibrary
from ops_support import cpu_s

SAMPLES = b"\x10\x20" * 2048


def wav_header_bomb(*, sample_rate: int = 1, channels: int = 1) -> bytes:
    """A 4,140-byte WAV whose header declares ``sample_rate`` and ``channels``."""
    block = 2 * channels
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(SAMPLES)) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", len(SAMPLES)) + SAMPLES


def one_hertz(container: str, tmp_path: Path) -> bytes:
    """The same samples declared at 1 Hz in another container (muxed by the real FFmpeg at
    8 kHz; for FLAC, whose encoder refuses 1 Hz, the STREAMINFO rate is then set to 1 Hz)."""
    raw = tmp_path / "raw.s16"
    raw.write_bytes(SAMPLES)
    out = tmp_path / f"bomb.{container}"
    codec = ["-c:a", "pcm_s16le"] if container == "mka" else []
    rate = "8000" if container == "flac" else "1"
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "s16le", "-ar", rate, "-ac", "1",
         "-i", str(raw), *codec, str(out)],
        check=True,
    )
    data = bytearray(out.read_bytes())
    if container == "flac":
        # fLaC, a 4-byte block header, then STREAMINFO: the 20-bit rate starts at byte 18
        assert data[:4] == b"fLaC"
        data[18], data[19] = 0x00, 0x00
        data[20] = (0x1 << 4) | (data[20] & 0x0F)
    return bytes(data)


def tone(seconds: float = 4.0) -> bytes:
    return subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", f"sine=frequency=220:duration={seconds}:sample_rate=24000",
         "-f", "wav", "pipe:1"],
        capture_output=True, check=True,
    ).stdout


@pytest.fixture
def library(builtin_dir: Path, tmp_path: Path) -> VoiceLibrary:
    return VoiceLibrary(builtin_dir, tmp_path / "user")


@pytest.mark.parametrize("container", ["wav", "flac", "aiff", "mka"])
def test_a_1_hz_clip_is_refused_from_its_header(library: VoiceLibrary, container: str, tmp_path: Path) -> None:
    data = wav_header_bomb() if container == "wav" else one_hertz(container, tmp_path)
    assert len(data) < 40_000
    started = cpu_s()  # CPU, not wall: a stalled host is no bomb
    with pytest.raises(InvalidRequestError) as caught:
        library.create("bomb", data)
    assert caught.value.param == "audio_sample"
    # what the header says (1 Hz, so 2048 s for 2048 samples) is enough: nothing is decoded
    assert "1 Hz" in caught.value.message or "2048.0 s" in caught.value.message, caught.value.message
    # decoding it would take seconds and gigabytes; the refusal costs the decoding child's start
    # (Python and PyAV: ~0.1-0.5 s of CPU)
    assert cpu_s() - started < 5.0


def test_hundreds_of_channels_are_refused_from_the_header(library: VoiceLibrary) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        library.create("wide", wav_header_bomb(sample_rate=24_000, channels=512))
    assert "512 channels" in caught.value.message, caught.value.message


def test_the_decoder_runs_under_a_memory_limit_the_os_enforces() -> None:
    """The decoding child cannot map more than its RLIMIT_AS: with 32 MiB it cannot even start
    (the kernel refuses the mappings) and the clip is refused, not decoded; with the default it
    is decoded."""
    clip = tone()
    with pytest.raises(InvalidRequestError) as caught:
        decode_clip(clip, "wav", DecodeLimits(memory_bytes=32 * 1_048_576), max_seconds=30)
    assert "could not be decoded" in caught.value.message
    samples = decode_clip(clip, "wav", DecodeLimits(), max_seconds=30)
    assert len(samples) == 4 * 24_000


def test_the_decoder_is_bounded_in_time(library: VoiceLibrary, builtin_dir: Path, tmp_path: Path) -> None:
    slow = VoiceLibrary(builtin_dir, tmp_path / "slow", decode_limits=DecodeLimits(timeout_s=0.001))
    with pytest.raises(InvalidRequestError) as caught:
        slow.create("late", tone())
    assert caught.value.param == "audio_sample"


def test_a_taken_name_is_refused_before_the_clip_is_decoded(library: VoiceLibrary) -> None:
    library.create("taken", tone())
    with pytest.raises(ConflictError):
        library.create("taken", wav_header_bomb())  # 409, not the bomb's 400: never decoded
    with pytest.raises(ConflictError):
        library.create("alloy", wav_header_bomb())  # built-in alias


def test_created_voices_are_capped(builtin_dir: Path, tmp_path: Path) -> None:
    capped = VoiceLibrary(builtin_dir, tmp_path / "user", max_created=1)
    capped.create("first", tone())
    with pytest.raises(InvalidRequestError) as caught:
        capped.create("second", wav_header_bomb())
    assert caught.value.code == "too_many_voices"
    capped.delete(capped.get("first").id)
    capped.create("second", tone())


def test_consent_is_capped(library: VoiceLibrary) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        library.create("consenting", tone(), consent="y" * 100_000)
    assert caught.value.param == "consent"


def test_lookups_do_not_rescan_the_voices_folders(library: VoiceLibrary, tmp_path: Path) -> None:
    user = tmp_path / "user"
    for i in range(30):
        (user / f"dropped-{i}.wav").write_bytes(b"RIFF")
    past = time.time() - 60
    for folder in (user, user / "created"):
        os.utime(folder, (past, past))
    library.get("dropped-3")
    builds = library._index.builds
    for _ in range(50):
        library.get("dropped-7")
        library.get("alloy")
    assert library._index.builds == builds
    # a voice dropped in meanwhile is seen at once
    (user / "newcomer.wav").write_bytes(b"RIFF")
    assert library.get("newcomer").name == "newcomer"


def test_an_unknown_huge_voice_name_is_not_echoed_whole(library: VoiceLibrary) -> None:
    from gateway.errors import VoiceNotFoundError

    with pytest.raises(VoiceNotFoundError) as caught:
        library.get("v" * 900_000)
    assert len(caught.value.message) < 500
