"""T3's tokens in groups that end where the vocoder stream's next window is due
(``vllm_stream_interval``, :mod:`gateway.engine.vllm.t3.delivery`).

vLLM needs a GPU, so its per-request gating is stood in for by :class:`_VllmState`, which does
what vLLM 0.24's ``RequestState.make_request_output`` does for a streaming request whose
interval is above 1 (``vllm/v1/engine/output_processor.py``): send on the first token, on
the last, or once ``stream_interval`` tokens have come since the last send, and then every
token from ``sent_tokens_offset`` on. The GPU visit runs the vLLM e2e suite with the setting
(docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gateway.engine.base import GenerationParams, SynthesisJob, Voice
from gateway.engine.vllm.engine import VllmEngine
from gateway.engine.vllm.t3.delivery import group_size, regroup
from gateway.engine.vllm.vocoder import Vocoder
from gateway.engine.vllm.vocoder_stream import VocoderStream
from gateway.engine.vllm.vocoder_windows import WindowPolicy
from gateway.settings import load_settings
from gateway.tools import parity_vocoder


class _VllmState:
    """vLLM 0.24's ``RequestState``: what the grouping reads and writes, and its gating."""

    def __init__(self, interval: int) -> None:
        self.stream_interval = interval
        self.sent_tokens_offset = 0
        self.tokens: list[int] = []

    def output(self, token: int, finished: bool) -> list[int] | None:
        self.tokens.append(token)
        if not (finished or self.sent_tokens_offset == 0
                or len(self.tokens) - self.sent_tokens_offset >= self.stream_interval):
            return None
        new = self.tokens[self.sent_tokens_offset:]
        self.sent_tokens_offset = len(self.tokens)
        return new


class _GroupingT3:
    """``AsyncLLM``'s shape with its ``output_processor``: one token a step (``step_s`` apart),
    sent as the request's state gates it; every delta is recorded."""

    def __init__(self, tokens: list[int], interval: int, step_s: float = 0.0) -> None:
        self.tokens, self.interval, self.step_s = tokens, interval, step_s
        self._processor = SimpleNamespace(external_req_ids=defaultdict(list), request_states={})
        self.output_processor = self._processor
        self.deltas: list[list[int]] = []

    async def generate(self, prompt, sampling, request_id):
        internal = f"{request_id}-0a1b2c3d"  # vLLM adds 8 random characters to our id
        processor = self._processor
        processor.external_req_ids[request_id].append(internal)
        state = processor.request_states[internal] = _VllmState(self.interval)
        try:
            for i, token in enumerate(self.tokens):
                await asyncio.sleep(self.step_s)
                finished = i == len(self.tokens) - 1
                new = state.output(token, finished)
                if new is not None:
                    self.deltas.append(new)
                    yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=new)], finished=finished)
        finally:
            del processor.request_states[internal]
            processor.external_req_ids.pop(request_id)


class _Untouchable:
    def __getattr__(self, name: str):
        raise AssertionError(f"vLLM's output processor was touched ({name})")


def _host(policy: WindowPolicy) -> SimpleNamespace:
    return SimpleNamespace(policy=policy, trim_fade=np.zeros(0, np.float32), wake=lambda: None,
                           next_ticket=lambda: 0, forget=lambda _s: None, count_dropped=lambda: None,
                           flow_room=lambda _tokens: 0)


def test_a_group_ends_at_the_tokens_the_next_window_wants_and_holds_at_most_the_cap() -> None:
    assert group_size(13, 1, 8) == 8  # Turbo's first window (10 + 3 lookahead), token 1 sent
    assert group_size(13, 9, 8) == 4  # the rest of it: the group ends at the 13th token
    assert group_size(13, 12, 8) == 1
    assert group_size(13, 13, 8) == 8  # the window is due already (the vocoder behind): plain groups
    assert group_size(13, 40, 8) == 8
    assert group_size(None, 5, 8) == 8  # no window waits for tokens (one-shot, final in flight)
    assert group_size(30, 1, 64) == 29


def test_the_tokens_a_stream_wants_follow_its_windows() -> None:
    policy = WindowPolicy(first_tokens=10, tokens=50, max_tokens=200)
    stream = VocoderStream(_host(policy), "v", {}, one_shot=False)
    assert stream.tokens_wanted() == 13  # the first window: 10 tokens and the 3 of lookahead
    stream.push(range(12))
    assert stream.ready_window(0.0) is None and stream.tokens_wanted() == 13
    stream.push([5])
    first = stream.ready_window(0.0)
    assert (first.end, first.input_end) == (10, 13)
    stream.take(first)
    assert stream.tokens_wanted() == 10 + 50 + 3  # while the first is in flight: the second's
    stream.cancel()
    assert stream.tokens_wanted() is None

    final = VocoderStream(_host(policy), "v", {}, one_shot=False)
    final.push(range(30))
    final.finish()
    window = final.ready_window(0.0)
    assert window.final  # T3 finished first: the whole utterance in one window
    final.take(window)
    assert final.tokens_wanted() is None  # nothing after a final window

    one_shot = VocoderStream(_host(policy), "v", {}, one_shot=True)
    one_shot.push(range(30))
    assert one_shot.tokens_wanted() is None  # every token only at the end


def test_regroup_sets_the_interval_of_the_vllm_request_behind_our_id() -> None:
    processor = SimpleNamespace(external_req_ids=defaultdict(list), request_states={})
    state = _VllmState(8)
    processor.external_req_ids["r1-0-abcd"].append("r1-0-abcd-12345678")
    processor.request_states["r1-0-abcd-12345678"] = state
    assert state.output(7, False) == [7]  # vLLM sends the first token at once
    regroup(processor, "r1-0-abcd", 13, 8)
    assert state.stream_interval == 8  # 1 sent, 12 missing: the cap
    for t in range(2, 10):
        state.output(t, False)
    assert state.sent_tokens_offset == 9
    regroup(processor, "r1-0-abcd", 13, 8)
    assert state.stream_interval == 4
    assert [state.output(t, False) for t in range(10, 14)] == [None, None, None, [10, 11, 12, 13]]
    regroup(processor, "gone", 13, 8)  # a request vLLM no longer holds: nothing happens
    assert "gone" not in processor.external_req_ids  # and no entry appears in vLLM's defaultdict


def _engine(s3gen, tmp_path, tokens: list[int], interval: int, step_s: float):
    settings = load_settings({}, {"load_format": "dummy", "cache_dir": str(tmp_path), "watermark": False,
                                  "flow_steps": 1, "max_speech_tokens": 64, "vllm_stream_interval": interval})
    engine = VllmEngine(settings)
    runtime = engine.runtimes["chatterbox"]
    runtime.llm = _GroupingT3(tokens, interval, step_s)
    runtime.vocoder = Vocoder(s3gen, settings, policy=WindowPolicy(first_tokens=6, tokens=8, max_tokens=16,
                                                                   left_context=4))
    runtime.components = SimpleNamespace(front_end=None, tokenizer=None, t3=None, watermarker=None)
    runtime.t3 = SimpleNamespace(tail_tokens=())

    async def prompt(runtime, job, text, trace=None):
        return SimpleNamespace(token_ids=[0] * 40, vllm_prompt=lambda dtype=None: {})

    engine._prompt = prompt
    engine._sampling = lambda runtime, job, index, rows: SimpleNamespace(to_vllm=lambda: None)
    return engine, runtime


async def _one_chunk(s3gen, engine: VllmEngine, runtime, max_tokens: int) -> list:
    """One streamed text chunk through the engine's chunk path: its audio chunks."""
    ref = parity_vocoder.reference_dict(s3gen, 12, 120.0, 0)
    job = SynthesisJob("r1", ("Hello.",), Voice("v", "v", SimpleNamespace(gen=ref)),
                       GenerationParams(max_speech_tokens=max_tokens), streaming=True)
    await runtime.vocoder.start()
    try:
        return [chunk async for chunk in engine._chunk(runtime, job, 0, "Hello.")]
    finally:
        await runtime.vocoder.close()


@pytest.mark.parametrize("step_s", [0.0, 0.02])
async def test_the_engine_groups_t3s_tokens_without_delaying_a_window(s3gen, tmp_path, step_s: float) -> None:
    """Through the engine's chunk path, the real vocoder on random S3Gen weights (CPU): with
    groups of up to 5, the first window's tokens (6 + 3 lookahead) arrive as 1, 5 and 3 (a
    group ends at the 9th, not at the 11th); every token arrives once and in order, all are
    vocoded, and there are fewer deliveries than tokens. ``step_s``: T3's step time (0: the vocoder never
    runs between steps; 20 ms: windows go in flight while T3 decodes)."""
    tokens = torch.randint(0, 6561, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    engine, runtime = _engine(s3gen, tmp_path, tokens, 5, step_s)
    chunks = await _one_chunk(s3gen, engine, runtime, len(tokens))
    deltas = runtime.llm.deltas
    assert [t for d in deltas for t in d] == tokens
    ends = np.cumsum([len(d) for d in deltas]).tolist()
    assert ends[:3] == [1, 6, 9]  # the first group, then up to the cap, then the rest of the first window
    assert max(len(d) for d in deltas[:-1]) <= 5 and len(deltas) < len(tokens) // 2
    assert sum(c.samples.size for c in chunks) == 40 * 960 and all(np.isfinite(c.samples).all() for c in chunks)
    assert sum(c.speech_tokens for c in chunks) == 40


async def test_groups_of_one_leave_vllm_alone(s3gen, tmp_path) -> None:
    """``vllm_stream_interval`` 1 (the default): every token at once, no request state touched."""
    tokens = list(range(100, 120))
    engine, runtime = _engine(s3gen, tmp_path, tokens, 1, 0.0)
    runtime.llm.output_processor = _Untouchable()  # the engine must not reach for vLLM's request states
    chunks = await _one_chunk(s3gen, engine, runtime, len(tokens))
    assert [len(d) for d in runtime.llm.deltas] == [1] * 20
    assert sum(c.samples.size for c in chunks) == 20 * 960
