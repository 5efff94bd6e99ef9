"""Read an uploaded clip structurally, inside limits the OS enforces.

A few kilobytes can ask a decoder for gigabytes: a WAV, FLAC, AIFF or Matroska header may
claim a 1 Hz sample rate (resampling that to 24 kHz builds a filter sized by the ratio),
thousands of channels, or hours of audio, and a FLAC frame may switch to 16 Hz after a
24 kHz header. So an upload is read by :mod:`gateway.voices.clip_decoder` in a child process
whose address space and CPU time are capped by ``setrlimit`` (the kernel kills or starves it
past them, whatever the file does) and whose wall time is capped by a timeout. The child
checks the stream's declared rate, channels and duration, then every decoded frame against
them, before it resamples anything, and stops at the duration limit; what it refuses is a
400 naming ``audio_sample``. Nothing is matched in text FFmpeg prints.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.voices import clip_decoder

DECODER_NICENESS = 10


@dataclass(frozen=True)
class DecodeLimits:
    memory_bytes: int = 1024 * 1_048_576
    cpu_s: int = 10
    timeout_s: float = 15.0
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000
    max_channels: int = 8
    deadline: float | None = None
    """When (``time.monotonic()``) the request's time limit ends: no FFmpeg child runs past it."""


class DecoderTimeoutError(Exception):
    """The decoding child ran past its wall-time limit and was killed."""


def run_limited(
    cmd: Sequence[str], limits: DecodeLimits, *, input_bytes: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` with RLIMIT_AS/RLIMIT_CPU set (and a lower priority) in the child before
    exec, and a wall timeout (the request's deadline, if that comes first)."""
    timeout_s = limits.timeout_s
    if limits.deadline is not None:
        timeout_s = min(timeout_s, limits.deadline - time.monotonic())
        if timeout_s <= 0:
            raise DecoderTimeoutError("the request's time limit has passed")
    try:
        return subprocess.run(
            list(cmd),
            input=input_bytes,
            capture_output=True,
            timeout=timeout_s,
            preexec_fn=_rlimits(limits),
        )
    except subprocess.TimeoutExpired:
        raise DecoderTimeoutError(f"the decoder took longer than {timeout_s:g} s") from None


def _rlimits(limits: DecodeLimits) -> Callable[[], None]:
    memory, cpu = limits.memory_bytes, limits.cpu_s

    def apply() -> None:  # runs in the child between fork and exec: only system calls
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        # a lower priority than the server: a burst of uploads must not starve the event loop
        os.nice(DECODER_NICENESS)

    return apply


def decode_clip(data: bytes, container: str, limits: DecodeLimits, *, max_seconds: float) -> np.ndarray:
    """The clip as float32 mono samples at 24 kHz (at most ``max_seconds`` plus the child's
    slack), read with the demuxer ``container``; InvalidRequestError (400) for anything the
    child refuses or cannot read, and when it runs out of time."""
    bounds = {
        "format": container,
        "max_seconds": max_seconds,
        "min_rate": limits.min_sample_rate,
        "max_rate": limits.max_sample_rate,
        "max_channels": limits.max_channels,
    }
    # -I: no PYTHONPATH, no user site, no current directory on the path: the child imports
    # only the standard library and PyAV, whatever the server's environment holds.
    cmd = [sys.executable, "-I", clip_decoder.__file__, json.dumps(bounds)]
    try:
        proc = run_limited(cmd, limits, input_bytes=data)
    except DecoderTimeoutError:
        raise _bad("audio_sample took too long to decode.") from None
    verdict = _verdict(proc.stderr)
    if proc.returncode == clip_decoder.REFUSED and isinstance(verdict.get("refused"), str):
        raise _bad(verdict["refused"])
    most = int((max_seconds + clip_decoder.DURATION_SLACK_S) * clip_decoder.OUTPUT_RATE + 1) * 4
    if proc.returncode != 0 or "codec" not in verdict or not proc.stdout or len(proc.stdout) > most:
        # a limit the OS enforces (memory, CPU) kills the child: the clip is not one we can read
        raise _bad("audio_sample could not be decoded as audio.")
    return np.frombuffer(proc.stdout[: len(proc.stdout) // 4 * 4], dtype="<f4")


def _verdict(stderr: bytes) -> dict[str, object]:
    """The child's last stderr line as JSON ({} when there is none: it died first)."""
    lines = stderr.strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return verdict if isinstance(verdict, dict) else {}


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="audio_sample", code="invalid_audio")
