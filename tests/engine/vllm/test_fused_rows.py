"""T3's fused sampling (``vllm_penalty = "fused"``): the draw against upstream's arithmetic
(penalty, temperature, min-p, softmax) by its frequencies, the deterministic part exactly, and
the seen ids through a batch that grows, shrinks, moves and swaps rows as vLLM's persistent
batch does, with partial prefills whose draws vLLM discards and output lists that hold only
placeholders (the values are never read)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from persistent_batch_support import PersistentBatch

from gateway.engine.vllm.t3.fused_rows import FUSED_ARG, FUSED_PROCESSOR, FusedRows, RowSampling, fusable
from gateway.engine.vllm.t3.penalty_rows import PLACEHOLDER

VOCAB = 24
SERVED = RowSampling(temperature=0.8, min_p=0.05, repetition_penalty=1.2)
TURBO = RowSampling(temperature=0.8, min_p=0.0, repetition_penalty=1.2, top_k=6, top_p=0.8, penalty_last=True)
"""Upstream ``inference_turbo``'s controls, top-k scaled to the test's vocabulary."""


def upstream_probs(logits: torch.Tensor, seen: set[int], s: RowSampling) -> torch.Tensor:
    """What upstream ``T3.inference`` samples from, for one row: transformers'
    ``RepetitionPenaltyLogitsProcessor`` (divide a positive score, multiply a negative one),
    the temperature, ``MinPLogitsWarper`` (drop what is below ``min_p`` x the top
    probability), softmax."""
    x = logits.double().clone()
    for t in seen:
        x[t] = x[t] / s.repetition_penalty if x[t] > 0 else x[t] * s.repetition_penalty
    probs = torch.softmax(x / s.temperature, dim=0)
    probs[probs < s.min_p * probs.max()] = 0
    return probs / probs.sum()


def test_the_draw_follows_upstreams_distribution() -> None:
    """40,000 draws of one row (as 4,000 identical rows, 10 steps, nothing kept): each token's
    frequency within 4.5 standard errors of upstream's probability, the min-p-dropped ones never."""
    torch.manual_seed(1)
    logits = torch.randn(VOCAB) * 2
    seen = [3, 7, 11, int(logits.argmax())]  # the top token among them: the penalty moves mass
    rows = FusedRows(4000, VOCAB, "cpu")
    for slot in range(4000):
        rows.add(slot, SERVED, list(seen))  # a resumed request: its ids folded at once
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for _ in range(10):
        out = rows.apply(logits.expand(4000, VOCAB).clone())
        drawn = out.argmax(dim=1)
        assert torch.equal(drawn, rows.last), "the argmax vLLM takes is the draw kept"
        counts += torch.bincount(drawn, minlength=VOCAB).double()
    expected = upstream_probs(logits, set(seen), SERVED)
    assert (expected == 0).any(), "the case has min-p-dropped tokens"
    assert (counts[expected == 0] == 0).all()
    n = counts.sum()
    freq = counts / n
    err = torch.sqrt(expected * (1 - expected) / n)
    assert ((freq - expected).abs() <= 4.5 * err + 1e-12).all(), (freq, expected)


def test_with_no_noise_the_logits_are_upstreams_processed_ones() -> None:
    """The deterministic part exactly: noise ``q = 1`` (``log q = 0``) leaves the penalised,
    tempered, min-p-masked logits; a row vLLM samples is left as it came."""
    rows = FusedRows(3, VOCAB, "cpu", noise=torch.ones_like)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    rows.add(0, SERVED, [1, 2, PLACEHOLDER])
    rows.add(1, None, [1, 2])
    rows.add(2, RowSampling(1.3, 0.0, 1.0), [4])
    out = rows.apply(logits.clone())
    for row, s, seen in ((0, SERVED, {1, 2}), (2, RowSampling(1.3, 0.0, 1.0), {4})):
        x = logits[row].double().clone()
        for t in seen:
            x[t] = x[t] / s.repetition_penalty if x[t] > 0 else x[t] * s.repetition_penalty
        x = x / s.temperature
        if s.min_p > 0:
            x[x < x.max() + math.log(s.min_p)] = -math.inf
        torch.testing.assert_close(out[row].double(), x, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1], logits[1])


def transformers_processed(logits: torch.Tensor, seen: list[int], s: RowSampling) -> torch.Tensor:
    """One row through transformers' own processors in upstream's order for ``s``:
    ``inference_turbo`` (temperature, top-k, top-p, repetition penalty) when ``penalty_last``,
    else ``T3.inference`` (repetition penalty, temperature, min-p, top-p)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([seen or [0]], dtype=torch.long)
    penalty = RepetitionPenaltyLogitsProcessor(s.repetition_penalty) if seen else (lambda _ids, x: x)
    steps = [TemperatureLogitsWarper(s.temperature)]
    if s.top_k:
        steps.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        steps.append(TopPLogitsWarper(s.top_p))
    if s.penalty_last:
        steps.append(penalty)
    else:
        steps = [penalty, steps[0], *([MinPLogitsWarper(s.min_p)] if s.min_p > 0 else []), *steps[1:]]
    x = logits.double()[None].clone()
    for step in steps:
        x = step(ids, x)
    return x[0]


def test_turbos_draw_follows_transformers_processors_in_upstreams_order() -> None:
    """Turbo's filters (top-k, then top-p) judge the logits before the penalty, which comes
    last: 40,000 draws of one row against transformers' processors, each frequency within 4.5
    standard errors, what they drop never. The seen ids are near the top, so the order
    matters: with the penalty first the kept set differs (checked)."""
    torch.manual_seed(2)
    logits = torch.randn(VOCAB) * 2
    order = logits.argsort(descending=True).tolist()
    seen = [order[0], order[4], order[9]]
    expected = torch.softmax(transformers_processed(logits, seen, TURBO), dim=0)
    first = torch.softmax(transformers_processed(logits, seen, dataclasses.replace(TURBO, penalty_last=False)), dim=0)
    assert not torch.equal(expected > 0, first > 0), "the case tells the two orders apart"
    rows = FusedRows(4000, VOCAB, "cpu")
    for slot in range(4000):
        rows.add(slot, TURBO, list(seen))
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for _ in range(10):
        counts += torch.bincount(rows.apply(logits.expand(4000, VOCAB).clone()).argmax(dim=1), minlength=VOCAB).double()
    assert (counts[expected == 0] == 0).all()
    n = counts.sum()
    err = torch.sqrt(expected * (1 - expected) / n)
    assert ((counts / n - expected).abs() <= 4.5 * err + 1e-12).all(), (counts / n, expected)


@pytest.mark.parametrize("case", range(8))
def test_with_no_noise_mixed_rows_are_transformers_processed_logits(case: int) -> None:
    """The deterministic part of rows with different filters and orders in one batch (the
    original's, Turbo's, top-p alone, top-k alone, a row vLLM samples): noise ``q = 1`` leaves
    exactly what transformers' processors give (the same finite values, -inf in the same places)."""
    gen = torch.Generator().manual_seed(100 + case)
    samplings = [SERVED, TURBO, RowSampling(1.1, 0.0, 1.3, top_p=0.7), RowSampling(0.9, 0.02, 1.1, top_k=3),
                 None, RowSampling(0.8, 0.0, 1.2, top_k=VOCAB + 5, top_p=0.9, penalty_last=True)]
    rows = FusedRows(len(samplings), VOCAB, "cpu", noise=torch.ones_like)
    logits = torch.randn(len(samplings), VOCAB, generator=gen) * 3
    seen = [torch.randperm(VOCAB, generator=gen)[:4].tolist() for _ in samplings]
    for slot, (s, ids) in enumerate(zip(samplings, seen, strict=True)):
        rows.add(slot, s, list(ids))
    out = rows.apply(logits.clone())
    for slot, (s, ids) in enumerate(zip(samplings, seen, strict=True)):
        if s is None:
            assert torch.equal(out[slot], logits[slot])
            continue
        expected = transformers_processed(logits[slot], ids, dataclasses.replace(s, top_k=min(s.top_k, VOCAB)))
        assert torch.equal(out[slot] == -math.inf, expected == -math.inf), (slot, s)
        finite = expected > -math.inf
        torch.testing.assert_close(out[slot][finite].double(), expected[finite], rtol=1e-6, atol=1e-6)


def test_a_batch_with_top_k_alone_is_cut_at_each_rows_k() -> None:
    """No row asks for top-p: the step skips it, and each row keeps its own k largest."""
    samplings = [RowSampling(0.9, 0.0, 1.1, top_k=3), RowSampling(1.2, 0.0, 1.3, top_k=7, penalty_last=True),
                 RowSampling(0.8, 0.05, 1.2)]
    rows = FusedRows(len(samplings), VOCAB, "cpu", noise=torch.ones_like)
    logits = torch.randn(len(samplings), VOCAB, generator=torch.Generator().manual_seed(9)) * 3
    for slot, s in enumerate(samplings):
        rows.add(slot, s, [1, 5])
    out = rows.apply(logits.clone())
    for slot, s in enumerate(samplings):
        expected = transformers_processed(logits[slot], [1, 5], s)
        assert torch.equal(out[slot] == -math.inf, expected == -math.inf), slot
        finite = expected > -math.inf
        torch.testing.assert_close(out[slot][finite].double(), expected[finite], rtol=1e-6, atol=1e-6)


class Batch(PersistentBatch):
    """vLLM's persistent batch as the processor sees it: slot i holds one request, whose output
    list grows by a placeholder each step vLLM keeps its draw; a request still prefilling
    (``prefill`` steps left) has its draws discarded."""

    def __init__(self, rows: FusedRows, rng: random.Random) -> None:
        super().__init__(rows)
        self.rng = rng

    def add(self) -> None:
        sampling = self.rng.choice([SERVED, RowSampling(1.0, 0.0, 2.0), None])
        resumed = [self.rng.randrange(VOCAB) for _ in range(self.rng.choice([0, 0, 3]))]
        request = {"sampling": sampling, "output": list(resumed), "kept": set(resumed),
                   "prefill": self.rng.choice([0, 1, 3])}
        self.slots.append(request)
        self.rows.add(len(self.slots) - 1, sampling, request["output"])

    def step(self) -> None:
        logits = torch.randn(len(self.slots), VOCAB, generator=torch.Generator().manual_seed(self.rng.randrange(1 << 30)))
        out = self.rows.apply(logits.clone())
        drawn = out.argmax(dim=1).tolist()
        for slot, request in enumerate(self.slots):
            if request["sampling"] is None:
                assert torch.equal(out[slot], logits[slot]), "a row vLLM samples is untouched"
                request["output"].append(PLACEHOLDER)
                continue
            # what the processor knew of this request before the draw
            assert set(torch.nonzero(self.rows.seen[slot]).flatten().tolist()) == request["kept"], slot
            if request["prefill"] > 0:
                request["prefill"] -= 1  # vLLM discards this draw: the list does not grow
            else:
                request["output"].append(PLACEHOLDER)  # the value is never read
                request["pending"] = drawn[slot]
        for request in self.slots:
            if "pending" in request:  # folded at the next step, as the processor does
                request["kept"].add(request.pop("pending"))


@pytest.mark.parametrize("seed", range(6))
def test_seen_ids_follow_the_kept_draws_through_a_changing_batch(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch = Batch(FusedRows(12, VOCAB, "cpu"), rng)
    for _ in range(4):
        batch.add()
    for _ in range(150):
        action = rng.random()
        if action < 0.15 and len(batch.slots) < 12:
            batch.add()
        elif action < 0.3 and len(batch.slots) > 1:
            batch.remove(rng.randrange(len(batch.slots)))
        elif action < 0.45 and len(batch.slots) > 1:
            batch.swap(*rng.sample(range(len(batch.slots)), 2))
        if batch.slots:
            batch.step()


def test_no_fused_row_means_no_work_and_the_logits_untouched() -> None:
    rows = FusedRows(4, VOCAB, "cpu")
    rows.add(0, None, [4, 5])
    logits = torch.randn(1, VOCAB)
    assert rows.apply(logits) is logits and not rows.active
    rows.add(1, SERVED, [])
    assert rows.active
    rows.remove(1)
    assert not rows.active
    rows.add(2, SERVED, [])
    rows.move(2, 0, swap=False)  # condense: the fused request now in slot 0, slot 2 empty
    assert rows.active and set(rows._outputs) == {0}


def test_a_freed_slot_forgets_its_old_request() -> None:
    rows = FusedRows(2, VOCAB, "cpu", noise=torch.ones_like)
    rows.add(0, RowSampling(1.0, 0.0, 2.0), [7, 8, 9])
    logits = torch.ones(1, VOCAB)
    assert (rows.apply(logits.clone())[0, [7, 8, 9]] == 0.5).all()
    rows.remove(0)
    rows.add(0, RowSampling(1.0, 0.0, 2.0), [1])
    out = rows.apply(logits.clone())[0]
    assert out[1] == 0.5 and (out[[7, 8, 9]] == 1).all()


def test_sampling_values_are_checked() -> None:
    with pytest.raises(ValueError, match="positive temperature"):
        RowSampling(0.0, 0.05, 1.2)
    with pytest.raises(ValueError, match="min_p"):
        RowSampling(0.8, 1.5, 1.2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        RowSampling(0.8, 0.05, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        RowSampling(0.8, 0.0, 1.2, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        RowSampling(0.8, 0.0, 1.2, top_p=0.0)
    with pytest.raises(ValueError, match=FUSED_ARG):
        RowSampling.from_arg([0.8, 0.05, 1.2])
    with pytest.raises(ValueError, match="whole"):
        RowSampling.from_arg([0.8, 0.05, 1.2, 2.5, 1.0, 0.0])
    assert RowSampling.from_arg(SERVED.to_arg()) == SERVED
    assert RowSampling.from_arg(TURBO.to_arg()) == TURBO
    with pytest.raises(ValueError, match="width"):
        rows = FusedRows(1, VOCAB, "cpu")
        rows.add(0, SERVED, [])
        rows.apply(torch.zeros(1, VOCAB + 1))


def test_what_can_be_fused() -> None:
    assert fusable(temperature=0.8, seed=None)
    assert not fusable(temperature=0.0, seed=None)  # greedy stays greedy
    assert not fusable(temperature=0.8, seed=3)  # vLLM's per-request generator


def test_a_fused_request_comes_to_vllm_as_greedy_and_carries_its_sampling() -> None:
    from gateway.engine.vllm.t3.families import T3Sampling
    from gateway.engine.vllm.t3.penalty_rows import engine_kwargs

    sampling = T3Sampling(max_tokens=9, temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2)
    fused = dataclasses.replace(sampling, penalty_path="fused").vllm_fields()
    assert (fused["temperature"], fused["min_p"], fused["repetition_penalty"]) == (0.0, 0.0, 1.0)
    assert fused["extra_args"] == {FUSED_ARG: [0.8, 0.05, 1.2, 0.0, 1.0, 0.0]}
    assert RowSampling.from_arg(fused["extra_args"][FUSED_ARG]) == SERVED
    plain = sampling.vllm_fields()
    changed = ("temperature", "min_p", "repetition_penalty", "extra_args")
    assert {k: v for k, v in fused.items() if k not in changed} == {k: v for k, v in plain.items() if k not in changed}
    # Turbo's filters go to the processor too, with upstream's order; vLLM is left greedy
    turbo = T3Sampling(max_tokens=9, temperature=0.7, top_p=0.95, min_p=0.0, repetition_penalty=1.2, top_k=1000,
                       penalty_after_filters=True, penalty_path="fused").vllm_fields()
    assert (turbo["temperature"], turbo["top_p"], turbo["top_k"], turbo["repetition_penalty"]) == (0.0, 1.0, 0, 1.0)
    assert RowSampling.from_arg(turbo["extra_args"][FUSED_ARG]) == RowSampling(0.7, 0.0, 1.2, 1000, 0.95, True)
    # what it cannot draw stays vLLM's, exactly as without it
    for other in (dataclasses.replace(sampling, seed=4), dataclasses.replace(sampling, temperature=0.0)):
        assert dataclasses.replace(other, penalty_path="fused").vllm_fields() == other.vllm_fields()
    assert engine_kwargs("fused") == {"logits_processors": [FUSED_PROCESSOR]}
    module, _, name = FUSED_PROCESSOR.partition(":")
    assert name == "FusedT3Sampling" and module == "gateway.engine.vllm.t3.fused"


def test_an_input_batch_spares_output_ids_only_when_no_processor_reads_them() -> None:
    """vLLM 0.24 waits each step for output ids whenever a custom processor is loaded; the
    plugin turns that off only where every custom one is known not to read them."""
    from types import SimpleNamespace

    from gateway.engine.vllm.t3.fused_rows import spare_output_ids

    builtin = type("MinPLogitsProcessor", (), {"__module__": "vllm.v1.sample.logits_processor.builtin"})()
    fused = type("FusedT3Sampling", (), {"reads_output_ids": False, "__module__": "gateway.engine.vllm.t3.fused"})()
    resident = type("ResidentRepetitionPenalty", (), {"__module__": "gateway.engine.vllm.t3.penalty"})()

    def batch(*procs, holder=None):  # noqa: ANN001, ANN202
        return SimpleNamespace(logitsprocs=SimpleNamespace(all=iter(procs)), logitsprocs_need_output_token_ids=True,
                               thinking_budget_state_holder=holder)

    spared = batch(builtin, fused)
    spare_output_ids(spared)
    assert spared.logitsprocs_need_output_token_ids is False
    for kept in (batch(builtin, fused, resident), batch(builtin), batch(builtin, fused, holder=object())):
        spare_output_ids(kept)
        assert kept.logitsprocs_need_output_token_ids is True
