"""An utterance fed chunk by chunk (the app's services, the fake engine): one engine job per
chunk in order, one valid audio stream, exact chunk boundaries, a slot only while a chunk is
spoken, and one cleanup path (barge-in or error) that cancels the job and returns the slot."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from harness import in_process
from ops_support import HOLD, GatedEngine

from gateway.audio.formats import pcm_spec
from gateway.engine.base import SAMPLE_RATE
from gateway.engine.fake import SAMPLES_PER_TOKEN, FakeEngine
from gateway.errors import OverloadedError
from gateway.http.caller import Caller
from gateway.http.protocol import SpeechRequest
from gateway.settings import Settings
from gateway.speech.utterance import AudioBytes, ChunkTimings, Utterance, plan_speech


CALLER = Caller(client="127.0.0.1", key_id=None)


async def plan(services, **request):  # type: ignore[no-untyped-def]
    speech = SpeechRequest(model="chatterbox", input="", voice="alloy", **request)
    return await plan_speech(services, speech, pcm_spec(SAMPLE_RATE), CALLER)


async def collect(utterance: Utterance) -> tuple[bytes, list[ChunkTimings]]:
    audio, timings = bytearray(), []
    async for event in utterance.events():
        if isinstance(event, AudioBytes):
            audio += event.data
        else:
            timings.append(event)
    return bytes(audio), timings


async def test_chunks_are_jobs_in_order_and_their_boundaries_are_exact(settings: Settings) -> None:
    engine = FakeEngine()
    async with in_process(settings, engine) as gw:
        services = gw.app.state.services
        utterance = Utterance(services, await plan(services, seed=9), request_id="u")
        chunks = ["First chunk of text. ", "The second one, ", "and the third."]
        for chunk in chunks:
            utterance.say(chunk)
            await asyncio.sleep(0.01)  # arriving over time, as from an LLM
        assert utterance.pending_chars > 0 or utterance.stats.chunks_spoken > 0
        utterance.finish()
        audio, timings = await collect(utterance)
        await utterance.aclose()
    assert [job.request_id for job in engine.jobs] == ["u-0", "u-1", "u-2"]
    assert [job.params.seed for job in engine.jobs][0] == 9 and len({job.params.seed for job in engine.jobs}) == 3
    samples = [engine.speech_tokens_for(job.chunks[0], settings.max_speech_tokens) * SAMPLES_PER_TOKEN for job in engine.jobs]
    assert len(audio) == 2 * sum(samples)  # pcm s16le: every sample, once
    assert [t.text for t in timings] == chunks
    starts = [0, samples[0], samples[0] + samples[1]]
    for t, start, n in zip(timings, starts, samples):
        assert (t.start_s, t.end_s) == (start / SAMPLE_RATE, (start + n) / SAMPLE_RATE)
        assert t.chars.ends[-1] == pytest.approx(t.end_s - t.start_s)
        assert t.spoken.startswith(t.text[: len(t.text) - len(t.text.lstrip())])
    assert services.admission.in_flight == 0


async def test_cancel_drops_the_engine_job_and_returns_the_slot_at_once(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    async with in_process(settings, engine) as gw:
        services = gw.app.state.services
        utterance = Utterance(services, await plan(services), request_id="b")
        utterance.say(f"{HOLD} a chunk that the engine holds on to for a long while.")
        events = utterance.events()
        assert isinstance(await anext(events), AudioBytes)
        assert await asyncio.to_thread(engine.holding.wait, 5)
        assert services.admission.in_flight == 1
        await utterance.cancel()
        assert engine.cancelled == ["b-0"] and services.admission.in_flight == 0
        assert [event async for event in events] == []  # no audio after the cancel
        engine.gate.set()


async def test_an_overloaded_chunk_ends_the_utterance_with_the_error(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    config = msgspec.structs.replace(settings, max_in_flight=1, max_queued=0)
    async with in_process(config, engine) as gw:
        services = gw.app.state.services
        holder = await services.admission.acquire()  # someone else has the only slot
        utterance = Utterance(services, await plan(services), request_id="o")
        utterance.say("No room for this.")
        utterance.finish()
        with pytest.raises(OverloadedError):
            await collect(utterance)
        assert utterance.failed and engine.jobs == []
        await utterance.aclose()
        holder.release()
        assert services.admission.in_flight == 0


async def test_nothing_said_means_no_audio_and_no_engine_work(settings: Settings) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        utterance = Utterance(gw.app.state.services, await plan(gw.app.state.services), request_id="n")
        utterance.say("   ")  # whitespace is not a chunk
        utterance.finish()
        assert await collect(utterance) == (b"", [])
        await utterance.aclose()
        assert gw.engine.jobs == []

