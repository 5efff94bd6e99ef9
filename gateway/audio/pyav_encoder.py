"""The in-process route: FFmpeg's libraries through PyAV, no process to start.

Why: with a process per stream, starting a dynamically linked ``ffmpeg`` costs ~60-90 ms
before the first byte (loading its shared libraries), a static one ~13-18 ms; the same
encoders called in-process give the first bytes in 1-5 ms. CPU per audio-second is lower
in-process for opus, aac and flac, ~3 ms higher for mp3 (the wheel's libmp3lame build is
slower; same bytes out). Figures: docs/benchmarks.md.

How: one muxer per request writes into a non-seekable in-memory sink (so every muxer
behaves exactly as it does on FFmpeg's stdout pipe: nothing is ever rewritten), with
``flush_packets`` so each packet reaches the sink when it is muxed. Per input chunk we encode
it, mux what the encoder returns and hand back what the sink holds; nothing waits for the
next chunk. Speed != 1 runs the same atempo chain as the FFmpeg route, in a filter graph.

Threads and backpressure: the encoding runs in one worker thread per request (PyAV releases
the GIL inside the codec), never on the event loop. A feeder task pulls engine chunks, cuts
them into slices and has the worker encode them one at a time; the bytes wait in a queue for
the consumer. The stream's first slice is short (FIRST_SLICE_S), so the first bytes leave
after 0.2 s of audio is encoded, not a whole first window (the mp3 encoder alone needs ~7 ms
per 0.8 s); later slices are longer (SLICE_S), as each worker hand-off costs ~0.2 ms of CPU.
The feeder encodes the next slice only while fewer than READAHEAD_SLICES encoded slices
wait: like the FFmpeg route's stdin pipe, the engine runs ahead of a slow client by a
bounded amount (1.6 s of audio beyond the chunk in hand), and never waits for the network
while within it. The worker thread runs jobs in order, so closing (queued behind any job
still running when we were cancelled) can never free the codec under a running encode;
``finally`` waits for the close and joins the thread, so no thread outlives the stream.
FFmpeg's own thread pools are switched off (one thread per stream, see
``_one_ffmpeg_thread_per_stream``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np

from gateway.audio.formats import FormatSpec, atempo_factors, spec_of
from gateway.errors import EncoderError
from gateway.iterators import aclose_quietly

T = TypeVar("T")

THREAD_NAME_PREFIX = "audio-encoder"
# Audio in the stream's first worker job: the first bytes wait for this much to be encoded.
FIRST_SLICE_S = 0.2
# Most audio in any later worker job (fewer hand-offs: each costs ~0.2 ms of CPU).
SLICE_S = 0.8
# Encoded slices that may wait for a slow consumer (1.6 s of audio; the FFmpeg route's 64 KiB
# stdin pipe held ~0.7 s): within it the engine never waits on the network.
READAHEAD_SLICES = 2
# Formats the encoder is offered in order of preference: float input converts to these
# without a lossy step before the codec (as FFmpeg's own format negotiation would choose).
_PREFERRED_SAMPLE_FMTS = ("fltp", "flt", "s16", "s16p")


@functools.cache
def pyav_available() -> bool:
    """Whether PyAV imports here (checked once per process; importing it loads FFmpeg)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def name_native_thread() -> None:
    """Give the calling thread the OS-level name THREAD_NAME_PREFIX (Linux), so tools outside
    the process (the load test, ``top -H``) can count encoder threads in /proc/<pid>/task."""
    with contextlib.suppress(Exception):  # not Linux, or no prctl: the name is only a help
        import ctypes  # only in encoder threads, once each

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, THREAD_NAME_PREFIX.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


def _import_av() -> Any:
    try:
        import av  # heavy: loads FFmpeg's libraries, so only when this route is used
    except ImportError as exc:
        raise EncoderError("the in-process encoder needs PyAV: pip install av") from exc
    _one_ffmpeg_thread_per_stream()
    return av


@functools.cache
def _one_ffmpeg_thread_per_stream() -> bool:
    """Make the in-process FFmpeg size its thread pools to 1 CPU (process-wide).

    FFmpeg gives every filter graph (PyAV's resampler builds one per stream) a pool of as many
    threads as the machine has CPUs: 2 here, 128 per stream on a large GPU host. Each stream
    already has its worker thread and the encoders are single-threaded, so those pools only
    cost memory and scheduling. ``av_cpu_force_count(1)`` in the libavutil PyAV loaded (found
    in /proc/self/maps) stops them. False where that cannot be done (not Linux, unusual
    builds): encoding still works, with the pools."""
    import ctypes  # once per process

    with contextlib.suppress(OSError, AttributeError, ValueError, IndexError):
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                if "libavutil" in line:
                    ctypes.CDLL(line.split(None, 5)[5].strip()).av_cpu_force_count(1)
                    return True
    return False


class _Sink:
    """A write-only, non-seekable file: muxers write to it as to a pipe."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class PyAVEncoder:
    """One output file, encoded synchronously. Not thread-safe: call from one thread at a time.

    ``encode(samples)`` and ``finish()`` return the bytes that became ready; ``close()``
    releases the codec and muxer and may be called at any point, more than once.
    """

    def __init__(self, spec: FormatSpec, *, sample_rate: int, speed: float) -> None:
        self._spec = spec
        self._sample_rate = sample_rate
        self._speed = speed
        self._time_base = Fraction(1, sample_rate)
        self._samples_in = 0
        self._sink = _Sink()
        self._container: Any = None
        self._stream: Any = None
        self._tempo: Any = None
        self._closed = False

    def encode(self, samples: np.ndarray) -> bytes:
        av = self._open()
        x = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        if x.shape[1] == 0:
            return b""
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate = self._sample_rate
        frame.pts = self._samples_in
        frame.time_base = self._time_base
        self._samples_in += x.shape[1]
        with _as_encoder_error(self._spec):
            self._encode_frame(frame)
        return self._sink.take()

    def finish(self) -> bytes:
        """Flush the filter and the encoder, write the trailer; the file is complete."""
        self._open()
        with _as_encoder_error(self._spec):
            self._encode_frame(None)
            self._container.close()
        self._closed = True
        return self._sink.take()

    def close(self) -> None:
        if self._container is not None and not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):  # a half-written file: nothing to save
                self._container.close()
        self._closed = True
        self._tempo = self._stream = self._container = None

    def _open(self) -> Any:
        av = _import_av()
        if self._closed:
            raise EncoderError("the encoder is closed")
        if self._container is not None:
            return av
        spec = self._spec
        options = {"flush_packets": "1", **spec.muxer_options}
        if spec.bitexact:
            options["fflags"] = "+bitexact"
        with _as_encoder_error(spec):
            self._container = av.open(self._sink, mode="w", format=spec.container, options=options)
            stream = self._container.add_stream(spec.codec, rate=spec.sample_rate, layout="mono")
            codec_context = stream.codec_context
            codec_context.format = spec.sample_fmt or _sample_fmt_for(codec_context)
            if spec.bit_rate is not None:
                codec_context.bit_rate = spec.bit_rate
            self._stream = stream
            factors = atempo_factors(self._speed)
            if factors:
                self._tempo = _tempo_graph(av, self._sample_rate, factors)
        return av

    def _encode_frame(self, frame: Any) -> None:
        """Push a frame (None: end of input) through the tempo graph and the encoder."""
        if self._tempo is None:
            self._mux(frame)
            return
        self._tempo.push(frame)
        while True:
            try:
                out = self._tempo.pull()
            except EOFError:
                self._mux(None)
                return
            except _blocking_errors():
                return
            self._mux(out)

    def _mux(self, frame: Any) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


def _sample_fmt_for(codec_context: Any) -> str:
    offered = [f.name for f in codec_context.codec.audio_formats or ()]
    for name in _PREFERRED_SAMPLE_FMTS:
        if name in offered:
            return name
    return offered[0]


def _tempo_graph(av: Any, sample_rate: int, factors: list[float]) -> Any:
    graph = av.filter.Graph()
    graph.threads = 1  # see _one_ffmpeg_thread_per_stream
    node = graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=Fraction(1, sample_rate))
    for factor in factors:
        stage = graph.add("atempo", f"{factor:.6f}")
        node.link_to(stage)
        node = stage
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()
    return graph


def _blocking_errors() -> tuple[type[BaseException], ...]:
    import av  # already imported by the caller

    return (av.error.BlockingIOError, BlockingIOError)


@contextlib.contextmanager
def _as_encoder_error(spec: FormatSpec):  # type: ignore[no-untyped-def]
    import av  # already imported by the caller

    try:
        yield
    except (av.error.FFmpegError, ValueError) as exc:
        raise EncoderError(f"encoding {spec.codec} into {spec.container} failed: {exc}") from exc


async def encode_in_process(
    chunks: AsyncIterator[np.ndarray], *, response_format: str | FormatSpec, sample_rate: int, speed: float
) -> AsyncIterator[bytes]:
    try:
        _import_av()
    except EncoderError:
        await aclose_quietly(chunks)
        raise
    encoder = PyAVEncoder(spec_of(response_format), sample_rate=sample_rate, speed=speed)
    worker = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=THREAD_NAME_PREFIX, initializer=name_native_thread
    )
    ready: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the feeder has ended
    room = asyncio.Semaphore(READAHEAD_SLICES)
    steps = (max(1, round(sample_rate * FIRST_SLICE_S)), max(1, round(sample_rate * SLICE_S)))
    feeder = asyncio.create_task(_feed(chunks, steps, encoder, worker, ready, room))
    try:
        while (data := await ready.get()) is not None:
            room.release()
            yield data
        await feeder  # the input's exception, or the encoder's, surfaces here
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
        try:
            # Queued behind any encode still running (the feeder may have been cancelled
            # while it ran), so the codec is never freed under it.
            closing = worker.submit(encoder.close)
            worker.shutdown(wait=False)
            await asyncio.shield(asyncio.wrap_future(closing))
            worker.shutdown(wait=True)  # the queue is empty: this only joins the exiting thread
        finally:
            await aclose_quietly(chunks)


async def _feed(
    chunks: AsyncIterator[np.ndarray],
    steps: tuple[int, int],
    encoder: PyAVEncoder,
    worker: concurrent.futures.Executor,
    ready: asyncio.Queue[bytes | None],
    room: asyncio.Semaphore,
) -> None:
    """Pull chunks, encode them in the worker a slice at a time (``steps``: the first slice's
    samples, then every later one's) while fewer than READAHEAD_SLICES encoded slices wait,
    queue the bytes; then finish the file. Always ends with None on ``ready``."""
    step = steps[0]
    try:
        async for chunk in chunks:
            samples = np.asarray(chunk).reshape(-1)
            start = 0
            while start < len(samples):
                piece = samples[start : start + step]
                start, step = start + step, steps[1]
                await room.acquire()
                data = await _in_worker(worker, encoder.encode, piece)
                if data:
                    ready.put_nowait(data)
                else:
                    room.release()
        data = await _in_worker(worker, encoder.finish)
        if data:
            ready.put_nowait(data)
    finally:
        ready.put_nowait(None)


async def _in_worker(worker: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.wrap_future(worker.submit(fn, *args))
