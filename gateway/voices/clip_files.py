"""Voice clip files: what an upload is, decoding it within bounds, and writing clips durably.

Decoding an upload is one child process under OS-enforced limits that checks the stream's
structure as it decodes (see :mod:`gateway.voices.clip_probe`). What is stored
is 24 kHz mono 16-bit FLAC, written to a temporary name, fsynced and renamed into place.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import numpy as np

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.errors import InvalidRequestError
from gateway.voices.clip_probe import DecodeLimits, DecoderTimeoutError, decode_clip

CLIP_SAMPLE_RATE = 24_000
_SILENCE_PEAK = 1e-4
_DECODE_TIMEOUT_S = 60


def decode_upload(clip_bytes: bytes, *, min_s: float, max_s: float, limits: DecodeLimits) -> np.ndarray:
    """An uploaded clip as float32 mono 24 kHz samples, or a 400 naming ``audio_sample``: the
    container is sniffed, then read by the decoding child under ``limits`` (which checks the
    stream's declared and decoded parameters before resampling and stops at ``max_s``); too
    short, too long or silent clips are refused."""
    container = sniff_container(clip_bytes)
    if container is None:
        raise InvalidRequestError(
            "audio_sample is not a supported audio file (WAV, FLAC, MP3, Ogg/Opus, AAC, M4A/MP4, WebM/Matroska, AIFF).",
            param="audio_sample",
        )
    samples = decode_clip(clip_bytes, container, limits, max_seconds=max_s)
    duration = len(samples) / CLIP_SAMPLE_RATE
    if duration < min_s:
        raise InvalidRequestError(
            f"audio_sample is {duration:.1f} s long; at least {min_s:g} s of speech is needed "
            "(6-10 s works best).",
            param="audio_sample",
        )
    if duration > max_s:
        raise InvalidRequestError(
            f"audio_sample is longer than {max_s:g} s; the model uses only the first 10 s, "
            "so trim it to 6-10 s of clean speech.",
            param="audio_sample",
        )
    if float(np.abs(samples).max(initial=0.0)) < _SILENCE_PEAK:
        raise InvalidRequestError("audio_sample is silent.", param="audio_sample")
    return samples


def sniff_container(data: bytes) -> str | None:
    """The FFmpeg demuxer for an upload, from its first bytes; None when it is not one we take.

    Naming the demuxer (never letting FFmpeg guess) keeps playlist and script formats (HLS,
    concat, ...) out: those could make FFmpeg open other files or URLs.
    """
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync: layer bits 00 are ADTS AAC, anything else MP3.
        return "aac" if head[1] & 0x06 == 0 else "mp3"
    return None


def write_flac(samples: np.ndarray, path: Path, *, deadline: float | None = None) -> None:
    """24 kHz mono 16-bit FLAC, written atomically (FFmpeg writes a temporary file in the same
    folder, seekable so the header carries the length; then fsync and rename). FFmpeg is
    killed at ``deadline`` (``time.monotonic()``, the request's time limit):
    :class:`DecoderTimeoutError`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    timeout_s = float(_DECODE_TIMEOUT_S)
    if deadline is not None:
        timeout_s = max(0.0, min(timeout_s, deadline - time.monotonic()))
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
           "-f", "f32le", "-ar", str(CLIP_SAMPLE_RATE), "-ac", "1", "-i", "pipe:0",
           "-c:a", "flac", "-sample_fmt", "s16", "-compression_level", "8",
           "-fflags", "+bitexact", "-flags:a", "+bitexact", "-f", "flac", "-y", str(tmp)]
    try:
        try:
            proc = subprocess.run(cmd, input=samples.astype("<f4").tobytes(), capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DecoderTimeoutError(f"FFmpeg took longer than {timeout_s:g} s to write FLAC") from None
        if proc.returncode != 0:
            raise RuntimeError(f"FFmpeg could not write FLAC: {proc.stderr.decode(errors='replace')[-500:]}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
