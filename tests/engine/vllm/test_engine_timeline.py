"""VllmEngine's first-audio timeline on the CPU: its chunk path (prompt, token stream into the
vocoder, the vocoder's batch, the samples out) with a scripted token source standing in for
vLLM (which needs a GPU) and the real batched vocoder on random S3Gen weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llm_engine_double import LLMEngineDouble

from gateway.engine.base import GenerationParams, SynthesisJob, Voice
from gateway.engine.vllm.engine import VllmEngine
from gateway.engine.vllm.engine_thread import TRACE_STAGES, ThreadedLLM
from gateway.engine.vllm.vocoder import Vocoder
from gateway.engine.vllm.vocoder_windows import WindowPolicy
from gateway.observability.timeline import Timeline
from gateway.settings import load_settings
from gateway.tools import parity_vocoder


class ScriptedT3:
    """``AsyncLLM.generate``'s shape: one token per delta, as vLLM streams a decode."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    async def generate(self, prompt, sampling, request_id):
        for token in self.tokens:
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[token])])


@pytest.mark.parametrize("t3", ["scripted", "engine thread"])
async def test_the_chunk_path_marks_every_stage_up_to_its_first_audio(s3gen, tmp_path, monkeypatch, t3) -> None:
    """With the engine core in a thread, vLLM's part is marked too (the engine thread's
    stages before the first tokens reach the event loop)."""
    settings = load_settings({}, {"load_format": "dummy", "cache_dir": str(tmp_path), "watermark": False,
                                  "flow_steps": 1, "max_speech_tokens": 64})
    engine = VllmEngine(settings)
    ref = parity_vocoder.reference_dict(s3gen, 12, 120.0, 0)
    tokens = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    runtime = engine.runtimes["chatterbox"]
    runtime.llm = (ScriptedT3(tokens) if t3 == "scripted"
                   else ThreadedLLM(lambda: LLMEngineDouble(tokens, per_step=1, first_after=2), name="test-engine"))
    runtime.vocoder = Vocoder(s3gen, settings, policy=WindowPolicy(first_tokens=6, tokens=8, left_context=4))
    runtime.components = SimpleNamespace(front_end=None, tokenizer=None, t3=None, watermarker=None)
    runtime.t3 = SimpleNamespace(tail_tokens=())

    async def prompt(runtime, job, text, trace=None):
        return SimpleNamespace(token_ids=[0] * 40, vllm_prompt=lambda dtype=None: {})

    monkeypatch.setattr(engine, "_prompt", prompt)
    monkeypatch.setattr(engine, "_sampling", lambda runtime, job, index, rows: SimpleNamespace(to_vllm=lambda: None))
    trace = Timeline()
    job = SynthesisJob("r1", ("Hello.", "Again."), Voice("v", "v", SimpleNamespace(gen=ref)),
                       GenerationParams(max_speech_tokens=20), streaming=True, trace=trace)
    await runtime.vocoder.start()
    try:
        chunks = [chunk async for chunk in engine._chunk(runtime, job, 0, "Hello.")]
    finally:
        await runtime.vocoder.close()
        if isinstance(runtime.llm, ThreadedLLM):
            runtime.llm.shutdown()
    assert sum(c.samples.size for c in chunks) == 20 * 960 and all(np.isfinite(c.samples).all() for c in chunks)
    stages = [stage for stage, _, _ in trace.rows()]
    vllm_side = list(TRACE_STAGES) if t3 == "engine thread" else []
    assert all(stages.count(stage) == 1 for stage in TRACE_STAGES) == bool(vllm_side)
    expected = ["t3 prompt built", *vllm_side, "t3 tokens: 1", "t3 tokens: 9", "vocoder window ready", "vocoder batch launched",
                "vocoder: flow encoder", "vocoder: CFM", "vocoder: HiFT", "vocoder: host copy",
                "vocoder audio delivered", "clipped"]
    at = [next(i for i, s in enumerate(stages) if s.startswith(e)) for e in expected]
    assert at == sorted(at), stages
    assert stages.count("clipped") == 1 and stages.count("vocoder audio delivered") == 1, "first audio only"
