"""T3 pauses while a batch of first windows runs (``t3_first_window_pause_ms``): the hold
itself (bounded, ended by the device's work), when a pause is allowed (no listener may feel
it), the engine thread that waits it out (a stand-in ``LLMEngine``), and the vocoder that asks
for it (the real S3Gen on the CPU, random weights)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
from llm_engine_double import LLMEngineDouble

from gateway.engine.vllm.engine_thread import ThreadedLLM
from gateway.engine.vllm.t3_pause import MIN_LEAD_S, T3Pause, t3_may_pause
from gateway.settings import SettingsError, load_settings
from gateway.tools import parity_vocoder

# --- the hold ----------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_hold_lasts_until_the_device_work_is_done() -> None:
    clock = _Clock()
    pause = T3Pause(0.08, clock=clock, sleep=clock.sleep)
    assert pause.wait() == 0.0 and clock.slept == []  # no hold: no wait
    pause.hold()
    done_at = clock.now + 0.030
    pause.until(lambda: clock.now >= done_at)
    waited = pause.wait()
    assert 0.030 <= waited < 0.031 and max(clock.slept) <= 0.0005, "polls the device in short sleeps"
    assert pause.wait() == 0.0, "a hold that ended is over for the later steps"
    assert (pause.holds, round(pause.held_s, 4)) == (1, round(waited, 4))


def test_a_hold_never_lasts_longer_than_its_bound() -> None:
    clock = _Clock()
    pause = T3Pause(0.05, clock=clock, sleep=clock.sleep)
    pause.hold()
    pause.until(lambda: False)  # a device that never finishes
    assert pause.wait() == pytest.approx(0.05, abs=1e-6)
    pause.hold()  # nobody says when the work ends (its launch failed): the bound still ends it
    assert pause.wait() == pytest.approx(0.05, abs=1e-6)
    pause.hold()
    pause.release()
    assert pause.wait() == 0.0


def test_a_later_hold_replaces_an_earlier_one() -> None:
    """The vocoder's batches run in order on its stream: the later batch's end is the later end."""
    clock = _Clock()
    pause = T3Pause(0.1, clock=clock, sleep=clock.sleep)
    pause.hold()
    pause.until(lambda: True)
    pause.hold()  # the next batch, launched before the engine thread looked
    second_done = clock.now + 0.02
    pause.until(lambda: clock.now >= second_done)
    assert pause.wait() == pytest.approx(0.02, abs=0.001) and pause.holds == 2


def test_a_pause_needs_a_bound() -> None:
    with pytest.raises(ValueError):
        T3Pause(0.0)


# --- when a pause is allowed ------------------------------------------------------------


@dataclasses.dataclass
class _Stream:
    closed: bool = False
    t3_done: bool = False
    first_window_taken: bool = False
    lead_s: float | None = None

    def t3_lead_s(self, now: float) -> float | None:
        return self.lead_s


def test_a_pause_is_allowed_only_when_no_listener_would_feel_it() -> None:
    pause_s = 0.08
    first_in_batch = _Stream(first_window_taken=True)
    assert t3_may_pause([first_in_batch], pause_s, 0.0), "one stream, its first window on the GPU"
    ahead = _Stream(first_window_taken=True, lead_s=pause_s + MIN_LEAD_S + 0.5)
    done = _Stream(t3_done=True, first_window_taken=True, lead_s=0.0)  # T3 has nothing left to make
    ended = _Stream(closed=True)
    assert t3_may_pause([first_in_batch, ahead, done, ended], pause_s, 0.0)
    # a listener close to running out of audio, a stream still waiting for its first tokens
    behind = _Stream(first_window_taken=True, lead_s=pause_s + MIN_LEAD_S - 0.01)
    waiting = _Stream()
    assert not t3_may_pause([first_in_batch, behind], pause_s, 0.0)
    assert not t3_may_pause([first_in_batch, waiting], pause_s, 0.0)


# --- the engine thread waits it out ------------------------------------------------------


async def test_the_engine_thread_takes_no_step_while_held() -> None:
    double = LLMEngineDouble(list(range(10)), step_s=0.001)
    llm = ThreadedLLM(lambda: double, name="test-engine")
    llm.pause = pause = T3Pause(30.0)  # far past any stall of the host: a release by the cue, not the cap
    device_done = threading.Event()
    try:
        pause.hold()
        pause.until(device_done.is_set)
        consumer = asyncio.ensure_future(_collect(llm, "a"))
        await asyncio.sleep(0.2)
        assert double.steps == 0 and not consumer.done(), "held: the request waits, no step runs"
        device_done.set()
        assert await asyncio.wait_for(consumer, 15.0) == list(range(10))
        assert pause.holds == 1 and 0.15 < pause.held_s < 15.0
    finally:
        llm.shutdown()


async def _collect(llm: ThreadedLLM, request_id: str) -> list[int]:
    tokens = []
    async for out in llm.generate({"prompt_embeds": None}, {"max_tokens": 9}, request_id):
        tokens.extend(out.outputs[0].token_ids)
    return tokens


def test_the_setting_needs_the_engine_core_in_a_thread() -> None:
    with pytest.raises(SettingsError, match="t3_first_window_pause_ms"):
        load_settings({}, {"t3_first_window_pause_ms": 80})
    settings = load_settings({}, {"t3_first_window_pause_ms": 80, "vllm_engine_core": "thread"})
    assert settings.t3_first_window_pause_ms == 80
    assert load_settings({}, {}).t3_first_window_pause_ms == 0, "off unless asked for"


# --- the vocoder asks for it --------------------------------------------------------------


@pytest.mark.slow
async def test_the_vocoder_holds_t3_for_a_first_window_unless_a_stream_waits_for_t3(s3gen) -> None:
    """A stream's first window holds T3, its later windows do not; a first window while
    another stream still waits for its first window's tokens does not either (T3 would delay
    that stream's first audio)."""
    from test_vocoder import SIZES, _tokens, _vocoder

    s3gen.float()  # embed_ref runs in the flow's dtype; a bf16 test may have cast it
    ref = parity_vocoder.reference_dict(s3gen, SIZES.prompt_tokens, 120.0, 0)

    async def first_audio(tokens: list[int]):  # type: ignore[no-untyped-def]
        stream = voc.open_stream("A", ref)
        stream.push(tokens)
        audio = stream.audio()
        assert (await asyncio.wait_for(anext(audio), 60)).size
        return stream, audio

    voc = _vocoder(s3gen)
    voc.t3_pause = pause = T3Pause(0.5)
    await voc.start()
    try:
        a, audio = await first_audio(_tokens(9, 1))  # a first window: 6 tokens + lookahead 3
        assert pause.holds == 1 and a.first_window_taken
        assert a.t3_lead_s(time.monotonic()) < 9 / 25, "the listener has started on its first audio"
        a.push(_tokens(20, 2))
        a.finish()
        assert [x async for x in audio] and pause.holds == 1, "later windows: no hold"
        waiting = voc.open_stream("A", ref)
        waiting.push(_tokens(2, 3))  # T3 has not made its first window yet
        b, b_audio = await first_audio(_tokens(9, 4))
        assert pause.holds == 1, "a stream waits for T3: no hold"
        waiting.cancel()
        b.push(_tokens(3, 5))  # b's listener has 0.48 s: T3 may not pause for b either
        c, c_audio = await first_audio(_tokens(9, 6))
        assert pause.holds == 1
        b.finish()  # T3 is done with b, and c's listener goes away
        await c_audio.aclose()
        d, d_audio = await first_audio(_tokens(9, 7))
        assert pause.holds == 2, "nobody waits for T3 any more: a first window holds it again"
        for audio in (b_audio, d_audio):
            await audio.aclose()
    finally:
        await voc.close()
    assert pause.wait() == 0.0, "on the CPU each batch's work is done when it is queued"


def test_the_engine_gives_the_vocoder_and_the_engine_thread_one_pause(s3gen, tmp_path) -> None:
    """With the engine core in a thread and the setting on, the family's vocoder and its engine
    thread share one pause; with an engine core process (``AsyncLLM``) there is none."""
    from types import SimpleNamespace

    from gateway.engine.vllm.engine import VllmEngine
    from gateway.models.families import ORIGINAL

    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "vllm_engine_core": "thread", "t3_first_window_pause_ms": 80,
                                                     "flow_steps": 1, "max_speech_tokens": 64})
    engine = VllmEngine(settings)
    runtime = engine.runtimes[ORIGINAL]
    runtime.components = SimpleNamespace(s3gen=s3gen)
    runtime.llm = ThreadedLLM(lambda: LLMEngineDouble([0]), name="test-engine")
    try:
        engine._build_vocoder(runtime, "cpu")
    finally:
        runtime.llm.shutdown()
    assert runtime.vocoder.t3_pause is runtime.llm.pause and runtime.llm.pause.max_s == 0.08
    runtime.llm = SimpleNamespace()  # AsyncLLM: its engine core steps in a process of its own
    engine._build_vocoder(runtime, "cpu")
    assert runtime.vocoder.t3_pause is None
