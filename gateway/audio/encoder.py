"""Float32 mono samples in, one streamed file of the requested format out.

Three routes, one contract (bytes are yielded as soon as they exist; closing the output early
closes the input and releases everything; every format below holds on every route):

- ``pcm`` and ``wav`` at speed 1.0 and 24 kHz need no codec: encoded in Python with exactly
  the bytes FFmpeg would write (same float->s16 rounding, same 44-byte streaming WAV header).
- in-process (``pyav_encoder``): FFmpeg's libraries through PyAV, in a worker thread. The
  default (``audio_encoder=auto`` when PyAV imports): no process to start, 1-5 ms to the first
  bytes against ~13-90 ms for starting an ``ffmpeg`` process (docs/benchmarks.md).
- FFmpeg process (``ffmpeg_process``): one ``ffmpeg`` child per request; the fallback
  (``audio_encoder=ffmpeg``, or ``auto`` without PyAV).

Both codec routes read one table (``formats.FORMATS``) and write to a non-seekable output,
so they produce the same kind of file. Output formats (every one a single valid file when the
yielded bytes are concatenated):

- mp3: MPEG-2 Layer III, 24 kHz mono, 64 kb/s CBR. No Xing/LAME header (FFmpeg writes one
  only to seekable outputs), an ID3v2 tag up front.
- opus: Ogg Opus, 48 kHz mono, 32 kb/s, one Ogg page per 20 ms packet so pages leave at once;
  the last page (end-of-stream flag, final granule position) leaves only when the input ends.
- aac: AAC-LC in ADTS frames, 24 kHz mono, 64 kb/s.
- flac: 24 kHz mono s16. STREAMINFO's total-samples and MD5 fields are 0 ("unknown"),
  which the FLAC spec allows for streams: a streamed header cannot be rewritten afterwards.
- wav: RIFF/WAVE, PCM s16le 24 kHz mono, canonical 44-byte header. The length is unknown
  while streaming, so the RIFF size and the ``data`` size are both 0xFFFFFFFF (what FFmpeg
  writes to a pipe); decoders read to the end of the data.
- pcm: raw s16le 24 kHz mono, no header.

Where the routes differ (not in the decoded format, codec, rate, channels or length): the
in-process route links the FFmpeg inside the ``av`` wheel, the process route whatever
``ffmpeg`` it finds, so encoder versions and tags (Ogg's ``encoder`` comment, the ID3 tag)
follow those builds; and the in-process route turns NaN/inf input into silence/full scale
before encoding, as the Python path does.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Literal

import numpy as np

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.audio.ffmpeg_process import encode_with_ffmpeg
from gateway.audio.formats import (
    CONTENT_TYPES,
    FORMATS,
    MAX_SPEED,
    MIN_SPEED,
    OPUS_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    FormatSpec,
    spec_of,
    validate,
)
from gateway.audio.pyav_encoder import PyAVEncoder, encode_in_process, pyav_available
from gateway.errors import InvalidRequestError
from gateway.iterators import aclose_quietly

__all__ = [
    "CONTENT_TYPES",
    "MAX_SPEED",
    "MIN_SPEED",
    "OPUS_SAMPLE_RATE",
    "OUTPUT_SAMPLE_RATE",
    "EncoderRoute",
    "encode_audio",
    "float_to_s16le",
    "resolve_route",
    "wav_stream_header",
    "warm_up",
]

EncoderRoute = Literal["auto", "inprocess", "ffmpeg"]

# 0xFFFFFFFF: "size unknown" in a streamed WAV header.
_UNKNOWN_SIZE = 0xFFFFFFFF


def resolve_route(route: EncoderRoute) -> Literal["inprocess", "ffmpeg"]:
    """``auto``: in-process when PyAV imports (it is a dependency), else the FFmpeg process."""
    if route == "auto":
        return "inprocess" if pyav_available() else "ffmpeg"
    return route


def warm_up(route: EncoderRoute) -> None:
    """Pay at start what the first request would: in-process, PyAV's import and each codec's
    first set-up (~0.1-0.3 s once per process); otherwise the FFmpeg binary's lookup.
    Blocking: run it off the event loop. Raises EncoderError when the route cannot work."""
    if resolve_route(route) == "ffmpeg":
        ffmpeg_exe()
        return
    silence = np.zeros(OUTPUT_SAMPLE_RATE // 10, dtype=np.float32)
    for spec in FORMATS.values():
        encoder = PyAVEncoder(spec, sample_rate=OUTPUT_SAMPLE_RATE, speed=1.0)
        try:
            encoder.encode(silence)
            encoder.finish()
        finally:
            encoder.close()


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


async def encode_audio(
    chunks: AsyncIterator[np.ndarray],
    *,
    response_format: str | FormatSpec,
    sample_rate: int,
    speed: float = 1.0,
    route: EncoderRoute = "auto",
) -> AsyncIterator[bytes]:
    """Encode float32 mono ``chunks`` at ``sample_rate`` into ``response_format`` bytes (a
    name of :data:`FORMATS`, or a spec at another rate or bit rate, see ``formats.pcm_spec``).

    Bytes are yielded as soon as they exist. Closing this generator early (client hung up)
    closes ``chunks`` and releases the encoder (FFmpeg killed and reaped, or the worker
    thread joined). An encoder failure raises EncoderError; an exception from ``chunks``
    propagates unchanged. ``route`` is the ``audio_encoder`` setting.
    """
    try:
        validate(response_format, sample_rate, speed)
    except InvalidRequestError:
        await aclose_quietly(chunks)
        raise
    spec = spec_of(response_format)
    if spec.codec == "pcm_s16le" and speed == 1.0 and sample_rate == spec.sample_rate == OUTPUT_SAMPLE_RATE:
        inner = _encode_in_python(chunks, with_header=spec.container == "wav")
    elif resolve_route(route) == "inprocess":
        inner = encode_in_process(chunks, response_format=response_format, sample_rate=sample_rate, speed=speed)
    else:
        inner = encode_with_ffmpeg(chunks, response_format=response_format, sample_rate=sample_rate, speed=speed)
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
