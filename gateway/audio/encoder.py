"""Float32 mono samples in, one streamed file of the requested format out.

One FFmpeg process per request: a writer task feeds raw float32 samples to its stdin (with
backpressure: it pulls the next chunk only when the pipe has room), the generator yields
stdout as FFmpeg produces it (``-flush_packets 1``), stderr is drained into a short tail for
error messages. Whatever ends the stream (done, an error, the consumer closing us early
because the client hung up), ``finally`` cancels the writer, closes the input iterator and
kills and reaps FFmpeg.

``pcm`` and ``wav`` at speed 1.0 need no codec, so they are encoded in Python with exactly
the bytes FFmpeg would write (same float->s16 rounding, same 44-byte streaming WAV header).

Output formats (every one a single valid file when the yielded bytes are concatenated):

- mp3: MPEG-2 Layer III, 24 kHz mono, 64 kb/s CBR. No Xing/LAME header (FFmpeg writes one
  only to seekable outputs), an ID3v2 tag up front.
- opus: Ogg Opus, 48 kHz mono, 32 kb/s, one Ogg page per 20 ms packet so pages leave at once.
- aac: AAC-LC in ADTS frames, 24 kHz mono, 64 kb/s.
- flac: 24 kHz mono s16. STREAMINFO's total-samples and MD5 fields are 0 ("unknown"),
  which the FLAC spec allows for streams.
- wav: RIFF/WAVE, PCM s16le 24 kHz mono, canonical 44-byte header. The length is unknown
  while streaming, so the RIFF size and the ``data`` size are both 0xFFFFFFFF (what FFmpeg
  writes to a pipe); decoders read to the end of the data.
- pcm: raw s16le 24 kHz mono, no header.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ffmpeg
import numpy as np

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.iterators import aclose_quietly
from gateway.errors import EncoderError, InvalidRequestError

CONTENT_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

MIN_SPEED = 0.25
MAX_SPEED = 4.0
OUTPUT_SAMPLE_RATE = 24_000
OPUS_SAMPLE_RATE = 48_000

_READ_SIZE = 64 * 1024
# The stdin pipe's write buffer: drain() blocks above this, which is what bounds how far the
# writer runs ahead of FFmpeg (about 0.7 s of float32 audio at 24 kHz).
_STDIN_HIGH_WATER = 64 * 1024
_STDERR_TAIL_LINES = 20
# 0xFFFFFFFF: "size unknown" in a streamed WAV header.
_UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class _Codec:
    output: dict[str, object]
    sample_rate: int
    extra: dict[str, object] = field(default_factory=dict)


_CODECS: dict[str, _Codec] = {
    "mp3": _Codec({"format": "mp3", "acodec": "libmp3lame", "b:a": "64k"}, OUTPUT_SAMPLE_RATE),
    "opus": _Codec(
        {"format": "ogg", "acodec": "libopus", "b:a": "32k"},
        OPUS_SAMPLE_RATE,
        # Microseconds of audio per Ogg page: one 20 ms Opus packet per page, so each page
        # is flushed as soon as it is encoded instead of after the 1 s default.
        {"page_duration": 20_000},
    ),
    "aac": _Codec({"format": "adts", "acodec": "aac", "b:a": "64k"}, OUTPUT_SAMPLE_RATE),
    "flac": _Codec({"format": "flac", "acodec": "flac", "sample_fmt": "s16"}, OUTPUT_SAMPLE_RATE),
    # bitexact: no LIST/INFO chunk, so the header is the canonical 44 bytes the Python path writes.
    "wav": _Codec(
        {"format": "wav", "acodec": "pcm_s16le"},
        OUTPUT_SAMPLE_RATE,
        {"fflags": "+bitexact", "flags:a": "+bitexact"},
    ),
    "pcm": _Codec({"format": "s16le", "acodec": "pcm_s16le"}, OUTPUT_SAMPLE_RATE),
}


def atempo_factors(speed: float) -> list[float]:
    """Split a tempo change into atempo stages each within [0.5, 2.0].

    Older FFmpeg builds reject atempo outside that range, and newer ones drop whole
    segments above 2.0; chaining keeps every stage a well-behaved time stretch.
    """
    factors: list[float] = []
    remaining = speed
    while remaining > 2.0:
        factors.append(2.0)
        remaining /= 2.0
    while remaining < 0.5:
        factors.append(0.5)
        remaining /= 0.5
    if not factors or abs(remaining - 1.0) > 1e-9:
        factors.append(remaining)
    return [f for f in factors if abs(f - 1.0) > 1e-9]


def build_command(*, response_format: str, sample_rate: int, speed: float) -> list[str]:
    """The FFmpeg command line for one request (raw float32 mono on stdin, file on stdout)."""
    codec = _CODECS[response_format]
    # Raw input needs no probing; tiny probe/analyze limits let the first frame through at once.
    stream = ffmpeg.input(
        "pipe:0", format="f32le", ar=sample_rate, ac=1, probesize=32, analyzeduration=0
    ).audio
    for factor in atempo_factors(speed):
        stream = stream.filter("atempo", f"{factor:.6f}")
    out = ffmpeg.output(
        stream,
        "pipe:1",
        ar=codec.sample_rate,
        ac=1,
        flush_packets=1,
        map_metadata=-1,
        **codec.output,
        **codec.extra,
    )
    return [ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", *ffmpeg.get_args(out)]


def float_to_s16le(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> s16le bytes, rounding exactly as FFmpeg's swresample does."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint(x * np.float32(32768.0)), -32768, 32767).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """The 44-byte header of a streamed mono s16le WAV whose length is not known yet."""
    block_align = 2
    return (
        b"RIFF"
        + struct.pack("<I", _UNKNOWN_SIZE)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * block_align, block_align, 16)
        + b"data"
        + struct.pack("<I", _UNKNOWN_SIZE)
    )


def _validate(response_format: str, sample_rate: int, speed: float) -> None:
    if response_format not in CONTENT_TYPES:
        raise InvalidRequestError(
            f"response_format must be one of {', '.join(CONTENT_TYPES)}; got {response_format!r}",
            param="response_format",
        )
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequestError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}; got {speed}", param="speed")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")


async def encode_audio(
    chunks: AsyncIterator[np.ndarray],
    *,
    response_format: str,
    sample_rate: int,
    speed: float = 1.0,
) -> AsyncIterator[bytes]:
    """Encode float32 mono ``chunks`` at ``sample_rate`` into ``response_format`` bytes.

    Bytes are yielded as soon as they exist. Closing this generator early (client hung up)
    closes ``chunks`` and kills FFmpeg. FFmpeg failure raises EncoderError; an exception
    from ``chunks`` propagates unchanged.
    """
    try:
        _validate(response_format, sample_rate, speed)
    except InvalidRequestError:
        await aclose_quietly(chunks)
        raise
    if response_format in ("pcm", "wav") and speed == 1.0 and sample_rate == OUTPUT_SAMPLE_RATE:
        inner = _encode_in_python(chunks, with_header=response_format == "wav")
    else:
        inner = _encode_with_ffmpeg(chunks, response_format=response_format, sample_rate=sample_rate, speed=speed)
    # aclosing: closing this generator must close the inner one now, not at garbage collection.
    async with contextlib.aclosing(inner):
        async for data in inner:
            yield data


async def _encode_in_python(chunks: AsyncIterator[np.ndarray], *, with_header: bool) -> AsyncIterator[bytes]:
    try:
        if with_header:
            yield wav_stream_header()
        async for chunk in chunks:
            data = float_to_s16le(chunk)
            if data:
                yield data
    finally:
        await aclose_quietly(chunks)


async def _encode_with_ffmpeg(
    chunks: AsyncIterator[np.ndarray], *, response_format: str, sample_rate: int, speed: float
) -> AsyncIterator[bytes]:
    cmd = build_command(response_format=response_format, sample_rate=sample_rate, speed=speed)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        await aclose_quietly(chunks)
        raise EncoderError(f"could not start FFmpeg ({cmd[0]}): {exc}") from exc

    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.transport.set_write_buffer_limits(high=_STDIN_HIGH_WATER)
    stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
    stderr_task = asyncio.create_task(_drain_stderr(proc.stderr, stderr_tail))
    writer = asyncio.create_task(_feed(proc, chunks))
    try:
        while data := await proc.stdout.read(_READ_SIZE):
            yield data
        # stdout closed: FFmpeg is done (or died). A failing input iterator wins over the
        # FFmpeg error it caused (it killed FFmpeg), so await the writer first.
        await writer
        returncode = await proc.wait()
        await stderr_task
        if returncode != 0:
            tail = " | ".join(stderr_tail) or "no error output"
            raise EncoderError(f"FFmpeg exited with status {returncode} encoding {response_format}: {tail}")
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        await aclose_quietly(chunks)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await stderr_task


async def _feed(proc: asyncio.subprocess.Process, chunks: AsyncIterator[np.ndarray]) -> None:
    """Write every chunk to FFmpeg's stdin, then close it (EOF lets FFmpeg finish the file)."""
    stdin = proc.stdin
    assert stdin is not None
    try:
        async for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype="<f4").reshape(-1).tobytes()
            if not data:
                continue
            if stdin.is_closing():
                # FFmpeg went away and its pipe is closed (writing now would raise RuntimeError,
                # not BrokenPipeError); its exit status and stderr tell why.
                return
            stdin.write(data)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        # FFmpeg went away; its exit status and stderr tell why.
        return
    except BaseException:
        # The input failed (or we were cancelled): this output can never be completed.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        raise
    finally:
        with contextlib.suppress(Exception):
            stdin.close()


async def _drain_stderr(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    while line := await stream.readline():
        text = line.decode("utf-8", "replace").strip()
        if text:
            tail.append(text)
