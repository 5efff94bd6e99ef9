"""The in-process route's own guarantees: the worker thread never outlives the stream (not
even when cancelled mid-encode), backpressure holds one chunk, and without PyAV it says so."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import numpy as np
import pytest
from audio_signals import SR, chunked, collect, endless, tone
from ops_support import wait_until
from harness import encoder_threads, ffmpeg_children

from gateway.audio.encoder import encode_audio, warm_up
from gateway.audio.pyav_encoder import FIRST_SLICE_S, READAHEAD_SLICES, SLICE_S, PyAVEncoder, encode_in_process
from gateway.errors import EncoderError
from gateway.tools import loadtest


async def test_early_close_joins_the_worker_and_closes_input() -> None:
    input_closed = asyncio.Event()
    assert encoder_threads() == set()
    out = encode_audio(endless(input_closed), response_format="mp3", sample_rate=SR, route="inprocess")
    assert await out.__anext__()
    assert len(encoder_threads()) == 1
    # the OS sees it by name too, and it is alone: threads FFmpeg starts from it inherit the
    # name, and FFmpeg would start a CPU-count-sized pool per stream for PyAV's resampler
    assert loadtest.encoder_threads(os.getpid()) == 1
    assert ffmpeg_children() == set()  # no process: the libraries run here
    await out.aclose()
    assert input_closed.is_set()
    assert encoder_threads() == set()  # joined: Python's view
    # The OS thread leaves /proc a moment after Python's join returns (join waits for the
    # thread's state lock, released just before the native thread exits): allow that moment.
    assert await asyncio.to_thread(wait_until, lambda: loadtest.encoder_threads(os.getpid()) == 0, 2.0)


async def test_cancelled_while_encoding_waits_for_the_encode_then_releases() -> None:
    # A long chunk keeps the worker busy; cancelling then must neither free the codec under
    # the running encode (a crash) nor leave the thread behind.
    handed_over = asyncio.Event()

    async def source() -> AsyncIterator[np.ndarray]:
        yield tone(0.2)
        handed_over.set()
        yield tone(60.0)
        await asyncio.Event().wait()

    async def consume() -> None:
        async for _ in encode_audio(source(), response_format="opus", sample_rate=SR, route="inprocess"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(handed_over.wait(), timeout=10)
    await asyncio.sleep(0.02)  # the 60 s chunk is in the worker now
    assert encoder_threads()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert encoder_threads() == set()


async def test_the_engine_runs_ahead_of_a_slow_consumer_by_a_bounded_amount() -> None:
    pulled = 0

    async def source() -> AsyncIterator[np.ndarray]:
        nonlocal pulled
        while True:
            pulled += 1
            yield tone(0.5)

    out = encode_audio(source(), response_format="mp3", sample_rate=SR, route="inprocess")
    try:
        assert await out.__anext__()
        await asyncio.sleep(0.3)  # a stalled consumer: the engine is pulled ahead, but not far
        # READAHEAD_SLICES slices wait (one of them the short first one), one 0.5 s chunk is
        # in hand being sliced
        ahead_s = pulled * 0.5
        assert 1.0 <= ahead_s <= READAHEAD_SLICES * SLICE_S + 1.0, pulled
    finally:
        await out.aclose()


async def test_the_first_bytes_wait_for_a_short_first_slice_then_slices_are_longer() -> None:
    encoded: list[int] = []
    original = PyAVEncoder.encode

    def recording(self: PyAVEncoder, samples: np.ndarray) -> bytes:
        encoded.append(len(samples))
        return original(self, samples)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PyAVEncoder, "encode", recording)
        one_chunk = chunked(tone(4.0), SR * 4)
        parts = [data async for data in encode_in_process(one_chunk, response_format="aac", sample_rate=SR, speed=1.0)]
    assert encoded[0] == round(SR * FIRST_SLICE_S) < round(SR * SLICE_S) == encoded[1]
    assert sum(encoded) == 4 * SR and len(parts) >= 4  # bytes leave slice by slice


async def test_pcm_matches_the_python_path_byte_for_byte() -> None:
    # The in-process swresample conversion rounds exactly as the Python path (and FFmpeg) do.
    audio = np.concatenate([tone(0.5), np.array([1.5, -1.5, 0.99999, -1.0, 0.5 / 32768], dtype=np.float32)])
    ours = await collect(encode_in_process(chunked(audio, 1000), response_format="pcm", sample_rate=SR, speed=1.0))
    python = await collect(encode_audio(chunked(audio, 1000), response_format="pcm", sample_rate=SR))
    assert ours == python


async def test_without_pyav_the_in_process_route_is_an_encoder_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError

    class Source:
        closed = False

        def __aiter__(self) -> Source:
            return self

        async def __anext__(self) -> np.ndarray:
            return tone(0.1)

        async def aclose(self) -> None:
            self.closed = True

    source = Source()
    with pytest.raises(EncoderError, match="PyAV"):
        await collect(encode_audio(source, response_format="mp3", sample_rate=SR, route="inprocess"))
    assert source.closed


def test_warm_up_sets_every_codec_up_and_leaves_nothing_running() -> None:
    warm_up("inprocess")  # raises if any format's encoder cannot be set up
    assert encoder_threads() == set()


def test_warm_up_fails_loudly_when_the_chosen_route_cannot_work(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(EncoderError, match="PyAV"):
        warm_up("inprocess")
