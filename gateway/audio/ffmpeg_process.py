"""The FFmpeg-process route: one ``ffmpeg`` child per request, samples on stdin, file on stdout.

A writer task feeds raw float32 samples to stdin (with backpressure: it pulls the next chunk
only when the pipe has room), the generator yields stdout as FFmpeg produces it
(``-flush_packets 1``), stderr is drained into a short tail for error messages. Whatever ends
the stream (done, an error, the consumer closing us early because the client hung up),
``finally`` cancels the writer, kills and reaps FFmpeg, reads its stdout to the end (so
asyncio closes the pipes at once) and closes the input iterator.

Starting the process is most of this route's first-byte cost (a dynamically linked FFmpeg
loads ~100 shared libraries); the in-process route (``pyav_encoder``) avoids it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import anyio
import ffmpeg
import numpy as np

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.audio.formats import FormatSpec, atempo_factors, spec_of
from gateway.errors import EncoderError
from gateway.iterators import aclose_quietly

_READ_SIZE = 64 * 1024
# The stdin pipe's write buffer: drain() blocks above this, which is what bounds how far the
# writer runs ahead of FFmpeg (about 0.7 s of float32 audio at 24 kHz).
_STDIN_HIGH_WATER = 64 * 1024
_STDERR_TAIL_LINES = 20
_EOF_TIMEOUT_S = 1.0


def build_command(*, response_format: str | FormatSpec, sample_rate: int, speed: float, exe: str | None = None) -> list[str]:
    """The FFmpeg command line for one request (raw float32 mono on stdin, file on stdout).
    ``exe``: the binary to run (default :func:`ffmpeg_exe`)."""
    spec = spec_of(response_format)
    # Raw input needs no probing; tiny probe/analyze limits let the first frame through at once.
    stream = ffmpeg.input(
        "pipe:0", format="f32le", ar=sample_rate, ac=1, probesize=32, analyzeduration=0
    ).audio
    for factor in atempo_factors(speed):
        stream = stream.filter("atempo", f"{factor:.6f}")
    codec_args: dict[str, object] = {"format": spec.container, "acodec": spec.codec}
    if spec.bit_rate is not None:
        codec_args["b:a"] = f"{spec.bit_rate // 1000}k"
    if spec.sample_fmt is not None:
        codec_args["sample_fmt"] = spec.sample_fmt
    if spec.bitexact:
        codec_args.update({"fflags": "+bitexact", "flags:a": "+bitexact"})
    out = ffmpeg.output(
        stream,
        "pipe:1",
        ar=spec.sample_rate,
        ac=1,
        flush_packets=1,
        map_metadata=-1,
        **codec_args,
        **spec.muxer_options,
    )
    return [exe or ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", *ffmpeg.get_args(out)]


async def encode_with_ffmpeg(
    chunks: AsyncIterator[np.ndarray],
    *,
    response_format: str | FormatSpec,
    sample_rate: int,
    speed: float,
    exe: str | None = None,
) -> AsyncIterator[bytes]:
    cmd = build_command(response_format=response_format, sample_rate=sample_rate, speed=speed, exe=exe)
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
            raise EncoderError(f"FFmpeg exited with status {returncode} encoding {_name(response_format)}: {tail}")
    finally:
        writer.cancel()
        # Shielded: a stream dropped by its client or a deadline is closed inside a cancelled
        # anyio scope (Litestar's Stream), where every unshielded await is cancelled again;
        # FFmpeg must still be killed and reaped, and its pipes read to the end and closed.
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            # before wait(): on Python 3.11 wait() returns only once every pipe has reached
            # its end, and an abandoned stdout is paused and full (stderr is being drained)
            await _read_to_eof(proc.stdout)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EOF_TIMEOUT_S):
                    await proc.wait()
            stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stderr_task
        await aclose_quietly(chunks)


async def _read_to_eof(stdout: asyncio.StreamReader) -> None:
    """Drop what FFmpeg left in its stdout pipe, up to the end. asyncio closes a child's pipes
    only once each has reached end-of-file; a stream abandoned mid-way (the client stopped
    reading, its response was dropped) leaves stdout paused and full, and its descriptor
    would stay open until garbage collection (one leaked pipe per dropped stream, issue 20).
    FFmpeg has been killed, so the end is near: at most the pipe's and the reader's buffers."""
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
        async with asyncio.timeout(_EOF_TIMEOUT_S):
            while await stdout.read(_READ_SIZE):
                pass


def _name(response_format: str | FormatSpec) -> str:
    return response_format if isinstance(response_format, str) else f"{response_format.codec} {response_format.sample_rate} Hz"


async def _feed(proc: asyncio.subprocess.Process, chunks: AsyncIterator[np.ndarray]) -> None:
    """Write every chunk to FFmpeg's stdin, then close it (EOF lets FFmpeg finish the file)."""
    stdin = proc.stdin
    assert stdin is not None
    try:
        async for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype="<f4").reshape(-1).tobytes()
            if not data:
                continue
            try:
                stdin.write(data)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError, RuntimeError):
                # FFmpeg went away (RuntimeError: asyncio already closed the pipe's transport
                # because the process exited); its exit status and stderr tell why.
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
