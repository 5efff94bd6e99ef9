"""Look at an uploaded clip before decoding it, and decode it inside OS-enforced limits.

A few kilobytes can ask the decoder for gigabytes: a WAV, FLAC, AIFF or Matroska header may
claim a 1 Hz sample rate (resampling that to 24 kHz builds a filter sized by the ratio) or
thousands of channels. So an upload is handled in two FFmpeg runs, each in a child process
whose address space and CPU time are capped by ``setrlimit`` (the kernel kills or starves it
past them, whatever the file does) and whose wall time is capped by a timeout:

1. :func:`probe_clip`: FFmpeg reads the container's header and prints what it found (no
   output file, so no decoding); sample rate, channels and duration must be within bounds,
   else a 400 at once;
2. the decode proper (``gateway.voices.clip_files.decode_to_mono``), under the same limits.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.errors import InvalidRequestError

_STREAM = re.compile(r"Stream #0:\d+[^:\n]*: Audio: [^\n]*?, (\d+) Hz, ([^,\n]+)")
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_CHANNELS = re.compile(r"(\d+) channels")
_NAMED_LAYOUTS = {"mono": 1, "stereo": 2}
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


@dataclass(frozen=True)
class ClipInfo:
    sample_rate: int
    channels: int | None
    duration_s: float | None


class DecoderTimeoutError(Exception):
    """The FFmpeg child ran past its wall-time limit and was killed."""


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
        raise DecoderTimeoutError(f"FFmpeg took longer than {timeout_s:g} s") from None


def _rlimits(limits: DecodeLimits) -> Callable[[], None]:
    memory, cpu = limits.memory_bytes, limits.cpu_s

    def apply() -> None:  # runs in the child between fork and exec: only system calls
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        # a lower priority than the server: a burst of uploads must not starve the event loop
        os.nice(DECODER_NICENESS)

    return apply


def ffmpeg_input_args(container: str, source: str, *, loglevel: str = "info") -> list[str]:
    """FFmpeg's input options: the demuxer we named, reading only the pipe or one file."""
    protocol = "file" if source != "pipe:0" else "pipe"
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", loglevel, "-threads", "1", "-f", container,
            "-protocol_whitelist", protocol, "-i", source]


def with_input(data: bytes, container: str, run: Callable[[str, bytes | None], subprocess.CompletedProcess[bytes]]):  # type: ignore[no-untyped-def]
    """Call ``run(source, stdin_bytes)`` with the clip on stdin, or, for MP4/M4A (whose index
    may sit at the end of the file and needs seeking), in a private temporary file."""
    if container == "mov":
        with tempfile.NamedTemporaryFile(suffix=".m4a") as tmp:
            tmp.write(data)
            tmp.flush()
            return run(tmp.name, None)
    return run("pipe:0", data)


def probe_clip(data: bytes, container: str, limits: DecodeLimits, *, max_duration_s: float) -> ClipInfo:
    """What the clip's header says, within bounds; InvalidRequestError (400) otherwise."""

    def run(source: str, stdin: bytes | None) -> subprocess.CompletedProcess[bytes]:
        # No output file: FFmpeg reads the header, prints the input's streams and stops.
        return run_limited([*ffmpeg_input_args(container, source)], limits, input_bytes=stdin)

    try:
        proc = with_input(data, container, run)
    except DecoderTimeoutError:
        raise _bad("audio_sample could not be read in time.") from None
    info = parse_probe(proc.stderr.decode("utf-8", "replace"))
    if info is None:
        raise _bad("audio_sample has no audio stream that could be read.")
    if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
        raise _bad(
            f"audio_sample has a sample rate of {info.sample_rate} Hz; "
            f"{limits.min_sample_rate}-{limits.max_sample_rate} Hz is accepted."
        )
    if info.channels is not None and info.channels > limits.max_channels:
        raise _bad(f"audio_sample has {info.channels} channels; at most {limits.max_channels} are accepted.")
    if info.duration_s is not None and info.duration_s > max_duration_s + 1.0:
        raise _bad(
            f"audio_sample is {info.duration_s:.1f} s long; the limit is {max_duration_s:g} s "
            "(the model uses only the first 10 s)."
        )
    return info


def parse_probe(stderr: str) -> ClipInfo | None:
    """Sample rate, channels and duration of the first audio stream in FFmpeg's input report."""
    stream = _STREAM.search(stderr)
    if stream is None:
        return None
    layout = stream.group(2).strip()
    counted = _CHANNELS.match(layout)
    channels = int(counted.group(1)) if counted else _NAMED_LAYOUTS.get(layout)
    duration = _DURATION.search(stderr)
    seconds = None
    if duration is not None:
        hours, minutes, secs = duration.groups()
        seconds = int(hours) * 3600 + int(minutes) * 60 + float(secs)
    return ClipInfo(sample_rate=int(stream.group(1)), channels=channels, duration_s=seconds)


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="audio_sample", code="invalid_audio")
