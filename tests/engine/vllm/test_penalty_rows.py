"""The device-resident repetition penalty (``vllm_penalty = "resident"``) against vLLM's own
arithmetic, recomputed from scratch every step, through a batch that grows, shrinks, moves and
swaps rows as vLLM's persistent batch does, with async scheduling's placeholder ids."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from persistent_batch_support import PersistentBatch

from gateway.engine.vllm.t3.penalty_rows import PLACEHOLDER, PenaltyRows

VOCAB = 40


def vllm_repetition_penalty(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]],
                            penalties: list[float]) -> torch.Tensor:
    """vLLM's ``apply_penalties`` with only a repetition penalty: every id in the row's prompt
    or output (placeholders and ids past the vocabulary ignored) is divided by the penalty when
    its logit is positive, multiplied when not."""
    out = logits.clone()
    for row, (prompt, output, penalty) in enumerate(zip(prompts, outputs, penalties, strict=True)):
        for token in set(prompt) | set(output):
            if 0 <= token < logits.shape[1]:
                value = logits[row, token]
                out[row, token] = value / penalty if value > 0 else value * penalty
    return out


class Batch(PersistentBatch):
    """vLLM's persistent batch, as far as the penalty sees it: slot i holds one request."""

    def __init__(self, rows: PenaltyRows, rng: random.Random) -> None:
        super().__init__(rows)
        self.rng = rng

    def add(self, penalty: float) -> None:
        request = {"prompt": [self.rng.randrange(VOCAB + 5) for _ in range(self.rng.randrange(0, 6))],
                   "output": [], "penalty": penalty}
        self.slots.append(request)
        self.rows.add(len(self.slots) - 1, penalty, request["prompt"], request["output"])

    def decode(self) -> None:
        """Each row samples a token; some arrive as a placeholder first (async scheduling)."""
        for request in self.slots:
            output = request["output"]
            if output and output[-1] == PLACEHOLDER:
                output[-1] = self.rng.randrange(VOCAB)  # the copy landed
            output.append(PLACEHOLDER if self.rng.random() < 0.3 else self.rng.randrange(VOCAB))

    def check(self) -> None:
        logits = torch.randn(len(self.slots), VOCAB, generator=torch.Generator().manual_seed(self.rng.randrange(1 << 30)))
        expected = vllm_repetition_penalty(logits, [r["prompt"] for r in self.slots],
                                           [r["output"] for r in self.slots], [r["penalty"] for r in self.slots])
        torch.testing.assert_close(self.rows.apply(logits.clone()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_resident_penalty_equals_vllms_through_a_changing_batch(seed: int) -> None:
    rng = random.Random(seed)
    batch = Batch(PenaltyRows(16, VOCAB, "cpu"), rng)
    for _ in range(4):
        batch.add(rng.choice([1.2, 2.0, 1.0]))
    for _ in range(120):
        batch.decode()
        action = rng.random()
        if action < 0.15 and len(batch.slots) < 16:
            batch.add(rng.choice([1.2, 1.5, 2.0, 1.0]))
        elif action < 0.3 and len(batch.slots) > 1:
            batch.remove(rng.randrange(len(batch.slots)))
        elif action < 0.45 and len(batch.slots) > 1:
            batch.swap(*rng.sample(range(len(batch.slots)), 2))
        if batch.slots:
            batch.check()


def test_no_penalised_row_means_no_work_and_the_logits_untouched() -> None:
    rows = PenaltyRows(4, VOCAB, "cpu")
    rows.add(0, 1.0, [1, 2, 3], [4, 5])
    logits = torch.randn(1, VOCAB)
    assert rows.apply(logits) is logits and not rows.active
    rows.add(1, 1.3, [], [])
    assert rows.active
    rows.remove(1)
    assert not rows.active


def test_a_freed_slot_forgets_its_old_request() -> None:
    rows = PenaltyRows(2, VOCAB, "cpu")
    rows.add(0, 2.0, [7], [8, 9])
    logits = torch.ones(1, VOCAB)
    assert (rows.apply(logits.clone())[0, [7, 8, 9]] == 0.5).all()
    rows.remove(0)
    rows.add(0, 2.0, [1], [])
    out = rows.apply(logits.clone())[0]
    assert out[1] == 0.5 and (out[[7, 8, 9]] == 1).all()


def test_ids_outside_the_vocabulary_are_ignored() -> None:
    rows = PenaltyRows(1, VOCAB, "cpu")
    rows.add(0, 2.0, [VOCAB, VOCAB + 3, -5], [VOCAB + 1, 3])
    out = rows.apply(-torch.ones(1, VOCAB))[0]
    assert out[3] == -2 and (out[torch.arange(VOCAB) != 3] == -1).all()


def test_a_resident_request_turns_vllms_penalty_off_and_carries_its_own() -> None:
    from gateway.engine.vllm.t3.families import T3Sampling
    from gateway.engine.vllm.t3.penalty_rows import EXTRA_ARG, PROCESSOR, engine_kwargs

    sampling = T3Sampling(max_tokens=9, temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2)
    assert sampling.vllm_fields()["repetition_penalty"] == 1.2 and sampling.vllm_fields()["extra_args"] is None
    resident = dataclasses.replace(sampling, penalty_path="resident").vllm_fields()
    assert resident["repetition_penalty"] == 1.0 and resident["extra_args"] == {EXTRA_ARG: 1.2}
    # everything else as before
    assert {k: v for k, v in resident.items() if k not in ("repetition_penalty", "extra_args")} == {
        k: v for k, v in sampling.vllm_fields().items() if k not in ("repetition_penalty", "extra_args")}
    no_penalty = dataclasses.replace(sampling, repetition_penalty=1.0, penalty_path="resident").vllm_fields()
    assert no_penalty["repetition_penalty"] == 1.0 and no_penalty["extra_args"] is None
    assert engine_kwargs("resident") == {"logits_processors": [PROCESSOR]} and engine_kwargs("sampler") == {}
    module, _, name = PROCESSOR.partition(":")
    assert name == "ResidentRepetitionPenalty" and module == "gateway.engine.vllm.t3.penalty"


def test_the_engine_asks_for_the_penalty_path_it_is_set_to(tmp_path) -> None:
    from gateway.engine.base import GenerationParams, SynthesisJob, Voice
    from gateway.engine.vllm.engine import VllmEngine
    from gateway.engine.vllm.t3.families import LlamaFamilyT3
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder
    from gateway.settings import load_settings

    for mode in ("sampler", "resident", "fused"):
        settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                        "vllm_penalty": mode})
        engine = VllmEngine(settings)
        runtime = engine.runtimes["chatterbox"]
        runtime.t3 = LlamaFamilyT3(runtime.family, T3PromptBuilder())
        job = SynthesisJob("j", ("Hi.",), Voice("v", "v", None), GenerationParams(repetition_penalty=1.3),
                           model="chatterbox")
        sampling = engine._sampling(runtime, job, 0, prompt_rows=100)
        assert sampling.penalty_path == mode and sampling.repetition_penalty == 1.3
