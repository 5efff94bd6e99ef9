"""Pipecat's ``ElevenLabsTTSService`` (the multi-stream-input WebSocket), unchanged, pointed at
the gateway with its ``url``, driven as a pipeline processor with Pipecat's own test runner:
LLM text in, TTSAudioRawFrames and word timestamps out; a barge-in (InterruptionFrame) mid
sentence closes the context and the gateway cancels the engine job and frees its slot. Also
over wss:// (a certificate made in the test), and its HTTP variant (stream/with-timestamps)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService, ElevenLabsTTSService
from pipecat.tests.utils import SleepFrame, run_test

from agents_support import API_KEY, VOICE, agent_server, assert_cancelled_and_freed, assert_word_times, pcm_seconds
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from ops_support import HOLD, GatedEngine
from tls_support import make_tls_files

RATE = 24000
PARAMS = PipelineParams(audio_out_sample_rate=RATE)
REPLY = ["Hello there, ", "this reply comes ", "from the language model. ", "It has two sentences."]


def llm_turn(tokens: Sequence[str]) -> list[Frame]:
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(token) for token in tokens), LLMFullResponseEndFrame()]


def recording_word_times(tts: ElevenLabsTTSService | ElevenLabsHttpTTSService) -> list[tuple[str, float]]:
    """Record the (word, seconds) pairs the service computes from the alignment, passing them
    on unchanged (observation only)."""
    recorded: list[tuple[str, float]] = []
    original = tts.add_word_timestamps

    async def add_word_timestamps(word_times, *args, **kwargs):  # type: ignore[no-untyped-def]
        recorded.extend(word_times)
        return await original(word_times, *args, **kwargs)

    tts.add_word_timestamps = add_word_timestamps  # type: ignore[method-assign]
    return recorded


def audio_of(frames: Sequence[Frame]) -> bytes:
    chunks = [f for f in frames if isinstance(f, TTSAudioRawFrame)]
    assert chunks, [type(f).__name__ for f in frames]
    assert {(f.sample_rate, f.num_channels) for f in chunks} == {(RATE, 1)}
    return b"".join(f.audio for f in chunks)


async def run_pipeline(tts: ElevenLabsTTSService | ElevenLabsHttpTTSService, frames: list[Frame]) -> list[Frame]:
    """Pipecat's own test runner (source -> tts -> sink, then an EndFrame), bounded: a service
    waiting forever for a context's end must fail the test, not hang the suite."""
    down, _ = await asyncio.wait_for(run_test(tts, frames_to_send=frames, pipeline_params=PARAMS), timeout=60)
    return list(down)


def service(base_url: str) -> ElevenLabsTTSService:
    ws_url = base_url.replace("https://", "wss://").replace("http://", "ws://")
    return ElevenLabsTTSService(api_key=API_KEY, url=ws_url, settings=ElevenLabsTTSService.Settings(voice=VOICE))


async def test_a_turn_streams_audio_and_word_times(settings: Settings) -> None:
    with agent_server(settings, FakeEngine(piece_delay_s=0.005)) as live:
        tts = service(live.base_url)
        words = recording_word_times(tts)
        down = await run_pipeline(tts, [*llm_turn(REPLY), SleepFrame(sleep=3)])
        audio_s = pcm_seconds(audio_of(down), RATE)
        assert audio_s > 1
        assert_word_times(words, "".join(REPLY), audio_s)
        spoken = [f.text for f in down if isinstance(f, TTSTextFrame)]
        assert spoken == "".join(REPLY).split()
        assert len(live.engine.completed) >= 1 and live.engine.cancelled == []
        assert live.services.admission.in_flight == 0


async def test_barge_in_mid_sentence_cancels_the_engine_job(settings: Settings) -> None:
    engine = GatedEngine(hold_after=2, piece_delay_s=0.01)
    with agent_server(settings, engine) as live:
        tts = service(live.base_url)
        frames = [
            LLMFullResponseStartFrame(),
            LLMTextFrame(f"{HOLD} this first sentence is long enough to be cut off. "),
            LLMTextFrame("And the second one is still being "),
            SleepFrame(sleep=3),  # the first sentence is being spoken (and held) now (slack for a loaded machine)
            InterruptionFrame(),
            SleepFrame(sleep=1.0),
            *llm_turn(["After the barge in, ", "a new reply."]),
            SleepFrame(sleep=3),
        ]
        down = await run_pipeline(tts, frames)
        assert engine.holding.is_set()
        assert_cancelled_and_freed(live, HOLD)
        after = down[next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame)) :]
        assert pcm_seconds(audio_of(after), RATE) > 0.3  # the next turn is heard
        assert any("After the barge in" in "".join(job.chunks) for job in engine.jobs)
        assert any(rid in engine.completed for rid in (j.request_id for j in engine.jobs if "After" in "".join(j.chunks)))


async def test_over_wss(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    tls = make_tls_files(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))  # websockets' default context reads it
    with agent_server(settings, FakeEngine(piece_delay_s=0.005), tls=tls) as live:
        assert live.base_url.startswith("https://")
        tts = service(live.base_url)
        down = await run_pipeline(tts, [TTSSpeakFrame("Spoken over TLS."), SleepFrame(sleep=2)])
        assert pcm_seconds(audio_of(down), RATE) > 0.3


async def test_the_http_variant(settings: Settings) -> None:
    with agent_server(settings, FakeEngine(piece_delay_s=0.005)) as live:
        async with aiohttp.ClientSession() as session:
            tts = ElevenLabsHttpTTSService(
                api_key=API_KEY,
                aiohttp_session=session,
                base_url=live.base_url,
                settings=ElevenLabsHttpTTSService.Settings(voice=VOICE),
            )
            words = recording_word_times(tts)
            down = await run_pipeline(tts, [*llm_turn(REPLY), SleepFrame(sleep=2)])
        audio_s = pcm_seconds(audio_of(down), RATE)
        assert_word_times(words, "".join(REPLY), audio_s)
