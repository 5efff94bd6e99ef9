"""Reading audio back as a client would, with only what the install brings: no system
``ffmpeg`` or ``ffprobe`` needed.

- What a stream is (codec, rate, channels, the container's stated length): FFmpeg's own
  demuxers and decoders, in process through PyAV (the `av` wheel), where ffprobe would be
  used; the codec is named as ffprobe names it (``mp3``, not the decoder ``mp3float``).
- How long it really is: every sample decoded by the FFmpeg binary the gateway itself runs
  (:func:`gateway.audio.ffmpeg_binary.ffmpeg_exe`: the imageio-ffmpeg wheel's static build,
  else the system's), so a stream FFmpeg cannot read to the end fails here too.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import av

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.engine.base import SAMPLE_RATE


@dataclass(frozen=True)
class StreamInfo:
    codec: str
    sample_rate: int
    channels: int
    stated_s: float | None
    """The length the container states (None when it states none, as streamed files may)."""


@dataclass(frozen=True)
class Decoded:
    codec: str
    sample_rate: int
    channels: int
    duration_s: float
    """Measured by decoding every sample, not from container metadata."""


def raw_pcm_args(response_format: str) -> list[str]:
    """FFmpeg input options for our headerless ``pcm`` (s16le, 24 kHz, mono), else none."""
    return ["-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1"] if response_format == "pcm" else []


def stream_info(path: Path, response_format: str | None = None) -> StreamInfo:
    """The first audio stream of ``path`` as FFmpeg's demuxer sees it (ffprobe's
    ``-show_streams -show_format``, in process)."""
    raw = response_format == "pcm"
    options = {"sample_rate": str(SAMPLE_RATE), "ch_layout": "mono"} if raw else {}
    with av.open(str(path), format="s16le" if raw else None, options=options) as container:
        streams = container.streams.audio
        assert len(streams) == 1, f"{path.name}: {len(streams)} audio streams"
        context = streams[0].codec_context
        stated = container.duration / av.time_base if container.duration is not None else None
        return StreamInfo(context.codec.canonical_name, context.sample_rate, context.layout.nb_channels, stated)


def decode_file(data: bytes, response_format: str, folder: Path, *, strict: bool = False) -> Decoded:
    """Decode ``data`` (a file in ``response_format``) completely. ``strict``: any complaint
    of the decoder (a second header, a broken page) fails, not only an unreadable file."""
    assert data, "no audio bytes"
    path = folder / f"decoded-{time.monotonic_ns()}.{response_format}"
    path.write_bytes(data)
    info = stream_info(path, response_format)
    decoded = subprocess.run(
        [ffmpeg_exe(), "-v", "error", *raw_pcm_args(response_format), "-i", str(path), "-f", "f32le", "-"],
        capture_output=True,
        check=True,
    )
    if strict:
        assert decoded.stderr == b"", decoded.stderr.decode()
    seconds = len(decoded.stdout) / 4 / info.channels / info.sample_rate
    return Decoded(info.codec, info.sample_rate, info.channels, seconds)
