"""The fused sampling step as one Triton kernel (``fused_kernel``), run here through Triton's
interpreter on the CPU: with the same noise it gives what the eager step gives, to the bit,
through a batch that changes as vLLM's persistent batch does and through batches with top-k
and top-p (Turbo's); with its own noise its draws follow upstream's distribution."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton_support import build_for_h100

from gateway.engine.vllm.t3.fused_kernel import MAX_WIDTH, WARM_VARIANTS, _draw_rows, draw_rows, warm_up
from gateway.engine.vllm.t3.fused_rows import PARAMS, FusedRows, RowSampling
from gateway.engine.vllm.t3.penalty_rows import PLACEHOLDER

INTERPRETED = InterpretedFunction(_draw_rows)


@pytest.fixture(autouse=True)
def interpreted_language(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's own device functions (``tl.max``, ``tl.argmax``, ``tl.rand`` and what they call)
    were built for the GPU when Triton was imported without ``TRITON_INTERPRET``; the
    interpreter runs their plain functions instead, as it does when that is set."""
    import triton.experimental.gluon  # noqa: F401  (the interpreter imports it; it wants GPU builds of the below)
    import triton.language as tl
    import triton.language.random
    import triton.language.standard
    from triton.runtime.jit import JITFunction

    for module in (triton.language.standard, triton.language.random):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                interpreted = InterpretedFunction(value.fn)
                monkeypatch.setattr(module, name, interpreted)
                if getattr(tl, name, None) is value:
                    monkeypatch.setattr(tl, name, interpreted)


SERVED = RowSampling(temperature=0.8, min_p=0.05, repetition_penalty=1.2)
PLAIN = RowSampling(temperature=1.3, min_p=0.0, repetition_penalty=2.0)
LAST = RowSampling(temperature=0.9, min_p=0.1, repetition_penalty=1.5, penalty_last=True)


class SharedNoise:
    """One ``q ~ Exp(1)`` per call, handed to both steps in turn (eager first, then the kernel)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: torch.Tensor | None = None

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            self.pending = torch.empty(like.shape).exponential_(generator=self.generator)
            return self.pending
        q, self.pending = self.pending, None
        assert q.shape == like.shape
        return q


def twins(slots: int, vocab: int, seed: int) -> tuple[FusedRows, FusedRows]:
    noise = SharedNoise(seed)
    return (FusedRows(slots, vocab, "cpu", noise=noise, kernel=False),
            FusedRows(slots, vocab, "cpu", noise=noise, kernel=INTERPRETED))


def step_both(eager: FusedRows, kernel: FusedRows, logits: torch.Tensor) -> torch.Tensor:
    a = eager.apply(logits.clone())
    b = kernel.apply(logits.clone())
    assert torch.equal(a, b), [(tuple(i), float(a[tuple(i)]), float(b[tuple(i)])) for i in torch.nonzero(a != b)[:4]]
    assert torch.equal(eager.last[: logits.shape[0]], kernel.last[: logits.shape[0]])
    assert torch.equal(eager.seen, kernel.seen)
    assert kernel.uses_kernel and kernel.kernel_error is None, kernel.kernel_error  # the kernel drew, not a fallback
    return a


@pytest.mark.parametrize("vocab", [24, 8194])
def test_with_the_same_noise_the_kernel_is_the_eager_step(vocab: int) -> None:
    """Fused rows of each kind beside rows vLLM samples, the seen ids folded between steps: the
    logits, draws and seen masks equal to the bit (8194: the original's vocabulary, a block of
    16384 with its tail masked)."""
    eager, kernel = twins(6, vocab, seed=3)
    outputs: list[list[int]] = []
    for slot, sampling in enumerate([SERVED, None, PLAIN, LAST, None, SERVED]):
        ids = [slot, 2 * slot + 1] if sampling is not None else []
        outputs.append(list(ids))
        for rows in (eager, kernel):
            rows.add(slot, sampling, outputs[slot])
    generator = torch.Generator().manual_seed(4)
    for _ in range(5):
        logits = torch.randn(6, vocab, generator=generator) * 3
        logits[:, vocab // 2] = -math.inf  # a token the head masks
        out = step_both(eager, kernel, logits)
        assert torch.equal(out[1], logits[1]) and torch.equal(out[4], logits[4]), "vLLM's rows untouched"
        for ids in outputs:
            ids.append(PLACEHOLDER)  # every draw kept: folded at the next step


@pytest.mark.parametrize("seed", range(3))
def test_the_kernel_follows_the_eager_step_through_a_changing_batch(seed: int) -> None:
    rng = random.Random(seed)
    eager, kernel = twins(10, 24, seed)
    slots: list[dict] = []

    def add() -> None:
        sampling = rng.choice([SERVED, PLAIN, LAST, None])
        request = {"output": [rng.randrange(24) for _ in range(rng.choice([0, 2]))], "prefill": rng.choice([0, 2])}
        slots.append(request)
        for rows in (eager, kernel):
            rows.add(len(slots) - 1, sampling, request["output"])

    for _ in range(3):
        add()
    for _ in range(60):
        action = rng.random()
        if action < 0.2 and len(slots) < 10:
            add()
        elif action < 0.35 and len(slots) > 1:
            gone = rng.randrange(len(slots))  # vLLM's condense: the last request fills the hole
            for rows in (eager, kernel):
                rows.remove(gone)
                if gone != len(slots) - 1:
                    rows.move(len(slots) - 1, gone, swap=False)
            slots[gone] = slots[-1]
            slots.pop()
        elif action < 0.5 and len(slots) > 1:
            a, b = rng.sample(range(len(slots)), 2)
            for rows in (eager, kernel):
                rows.move(a, b, swap=True)
            slots[a], slots[b] = slots[b], slots[a]
        logits = torch.randn(len(slots), 24, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) * 2
        step_both(eager, kernel, logits)
        for request in slots:
            if request["prefill"]:
                request["prefill"] -= 1
            else:
                request["output"].append(PLACEHOLDER)


def test_the_kernels_own_noise_follows_upstreams_distribution() -> None:
    """2,000 draws (100 identical rows, 20 steps, nothing kept) with the kernel's Philox noise:
    each token's frequency within 4.5 standard errors of upstream's probability (penalty on the
    seen ids, temperature, min-p, softmax); the min-p-dropped ones never; each step a new draw."""
    vocab, n_rows = 24, 100
    torch.manual_seed(2)
    logits = torch.randn(vocab) * 2
    seen = [3, 7, 11, int(logits.argmax())]
    rows = FusedRows(n_rows, vocab, "cpu", kernel=INTERPRETED)
    for slot in range(n_rows):
        rows.add(slot, SERVED, list(seen))
    counts = torch.zeros(vocab, dtype=torch.float64)
    previous = None
    for _ in range(20):
        out = rows.apply(logits.expand(n_rows, vocab).clone())
        drawn = out.argmax(dim=1)
        assert torch.equal(drawn, rows.last), "the argmax vLLM takes is the draw kept"
        assert previous is None or not torch.equal(drawn, previous), "a fresh draw each step"
        previous = drawn
        counts += torch.bincount(drawn, minlength=vocab).double()
    x = logits.double().clone()
    for t in seen:
        x[t] = x[t] / SERVED.repetition_penalty if x[t] > 0 else x[t] * SERVED.repetition_penalty
    expected = torch.softmax(x / SERVED.temperature, dim=0)
    expected[expected < SERVED.min_p * expected.max()] = 0
    expected /= expected.sum()
    assert (expected == 0).any() and (counts[expected == 0] == 0).all()
    freq = counts / counts.sum()
    err = torch.sqrt(expected * (1 - expected) / counts.sum())
    assert ((freq - expected).abs() <= 4.5 * err + 1e-12).all(), (freq, expected)


TURBO = RowSampling(0.8, 0.0, 1.2, top_k=6, top_p=0.8, penalty_last=True)
"""Upstream ``inference_turbo``'s controls, top-k scaled to a 24-token vocabulary."""


@pytest.mark.parametrize("case", range(4))
def test_with_the_same_noise_top_k_and_top_p_are_the_eager_steps(case: int) -> None:
    """Batches that need the filters: Turbo's rows (top-k, top-p, the penalty last) beside rows
    with top-k alone, top-p alone (after min-p), none, and rows vLLM samples; ties at the k-th
    value (kept, as transformers keeps them). The kernel's cuts found bit by bit keep the set
    the eager step's sort keeps, so the same logits and draws."""
    rng = random.Random(case)
    mixes = [[TURBO, RowSampling(0.9, 0.0, 1.1, top_k=3), None, SERVED],
             [RowSampling(1.1, 0.05, 1.3, top_p=0.7), TURBO, RowSampling(0.7, 0.0, 1.2, top_k=5, top_p=0.9)],
             [TURBO, TURBO, PLAIN],
             [RowSampling(1.0, 0.0, 1.0, top_k=1), RowSampling(1.0, 0.0, 1.2, top_p=0.3, penalty_last=True), LAST]]
    samplings = mixes[case]
    eager, kernel = twins(len(samplings), 24, seed=10 + case)
    outputs = [[rng.randrange(24) for _ in range(3)] for _ in samplings]
    for slot, sampling in enumerate(samplings):
        for rows in (eager, kernel):
            rows.add(slot, sampling, outputs[slot])
    generator = torch.Generator().manual_seed(case)
    for step in range(6):
        logits = torch.randn(len(samplings), 24, generator=generator) * 2
        if step == 2:
            logits[:, 5:9] = logits[:, 5:6]  # four equal values: ties at a top-k edge somewhere
        logits[:, 23] = -math.inf
        step_both(eager, kernel, logits)
        for ids in outputs:
            ids.append(PLACEHOLDER)


def test_turbos_vocabulary_with_its_served_top_k_and_top_p() -> None:
    """Turbo's 6563 tokens (a block of 8192), top-k 1000 and top-p 0.95 as served: the eager
    step's logits and draws."""
    served = RowSampling(0.8, 0.0, 1.2, top_k=1000, top_p=0.95, penalty_last=True)
    eager, kernel = twins(2, 6563, seed=1)
    for rows in (eager, kernel):
        rows.add(0, served, [1, 2, 3])
        rows.add(1, SERVED, [4])
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        step_both(eager, kernel, torch.randn(2, 6563, generator=generator) * 4)


def test_one_slot_and_logits_of_any_layout() -> None:
    """A server of one sequence (``vllm_max_num_seqs`` 1: the parameters one column, which
    PyTorch may lay out with a column stride of 7; the HTTP benchmark's one-stream server of
    2026-12-07 died on it) and logits whose columns are not one apart: the eager step's numbers."""
    eager, kernel = twins(1, 24, seed=5)
    for rows in (eager, kernel):
        rows.add(0, SERVED, [1, 2])
    step_both(eager, kernel, torch.randn(1, 24))
    wide = torch.randn(1, 48)
    strided = wide.clone()[:, ::2]  # every other column of a wider row
    out = kernel.apply(strided)
    assert out is strided and torch.equal(out, eager.apply(wide[:, ::2].contiguous()))


def test_a_kernel_that_fails_gives_way_to_the_eager_step(caplog: pytest.LogCaptureFixture) -> None:
    """A build or launch that raises (a device Triton cannot build for) costs no request: that
    step and the later ones draw eagerly, the same numbers, and the reason is logged once."""

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no build for this device")
            return launch

    eager = FusedRows(2, 24, "cpu", noise=torch.ones_like, kernel=False)  # q = 1: the deterministic part
    broken = FusedRows(2, 24, "cpu", noise=torch.ones_like, kernel=Broken())
    for rows in (eager, broken):
        rows.add(0, SERVED, [1])
        rows.add(1, TURBO, [2])
    for _ in range(2):
        logits = torch.randn(2, 24)
        assert torch.equal(eager.apply(logits.clone()), broken.apply(logits.clone()))
    assert not broken.uses_kernel and broken.kernel_error == "RuntimeError: no build for this device"
    assert [r.levelname for r in caplog.records if "Triton kernel failed" in r.getMessage()] == ["WARNING"]
    at_start = FusedRows(2, 24, "cpu", kernel=Broken())
    at_start.warm_up()  # the engine's start: the same fallback before any step
    assert not at_start.uses_kernel and at_start.kernel_error == "RuntimeError: no build for this device"


def test_what_the_kernel_refuses() -> None:
    params = torch.zeros(7, 2)
    with pytest.raises(ValueError, match="wider"):
        draw_rows(torch.zeros(1, MAX_WIDTH + 1), torch.zeros(2, MAX_WIDTH + 1, dtype=torch.bool), params,
                  torch.zeros(2, dtype=torch.int64), seed=1, penalty_last=False, kernel=INTERPRETED)
    with pytest.raises(ValueError, match="one apart"):
        draw_rows(torch.zeros(2, 24), torch.zeros(24, 2, dtype=torch.bool).T, params,
                  torch.zeros(2, dtype=torch.int64), seed=1, penalty_last=False, kernel=INTERPRETED)
    with pytest.raises(ValueError, match="noise of shape"):
        draw_rows(torch.zeros(2, 24), torch.zeros(2, 24, dtype=torch.bool), params, torch.zeros(2, dtype=torch.int64),
                  seed=1, penalty_last=False, log_noise=torch.ones(1, 24), kernel=INTERPRETED)


def test_the_kernel_is_the_default_on_a_cuda_device_only() -> None:
    assert FusedRows(2, 24, "cpu")._kernel is False
    assert FusedRows(1, 24, "cpu")._params.stride() == (1, 1), "one slot: its column one apart"
    assert FusedRows(2, 24, "cpu", kernel=INTERPRETED)._kernel is INTERPRETED


def test_the_kernel_reads_the_parameter_rows_where_fused_rows_keeps_them() -> None:
    """The kernel reads rows 0-3 and 6 of the parameters by number."""
    assert PARAMS[:4] == ("temperature", "log_min_p", "penalty", "fused") and PARAMS[6] == "penalty_last"


def test_the_warm_up_runs_the_kernel_once_on_a_row_of_the_vocabulary() -> None:
    calls = []

    class Counting:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((grid, kwargs["BLOCK"], kwargs["PENALTY_LAST"], kwargs["HAS_NOISE"]))
                assert (kwargs["PENALTY_LAST"], kwargs["TOP_K"], kwargs["TOP_P"]) in WARM_VARIANTS
                return INTERPRETED[grid](*args, **kwargs)
            return run

    warm_up(8194, torch.device("cpu"), kernel=Counting())
    assert calls == [((1,), 16384, last, False) for last, _, _ in WARM_VARIANTS]


def test_every_warm_build_compiles_for_an_h100() -> None:
    """What a GPU visit would find first: each build the engine makes at its start (every
    ``WARM_VARIANTS`` entry, at both families' vocabulary widths: 8194 and 6563 ids) compiles
    for sm_90 through Triton's own ptxas, here, without a GPU."""
    signature = {"logits_ptr": "*fp32", "logits_stride": "i32", "seen_ptr": "*i1", "seen_stride": "i32",
                 "params_ptr": "*fp32", "params_stride": "i32", "last_ptr": "*i64", "log_noise_ptr": "*fp32",
                 "log_noise_stride": "i32", "seed": "i32", "width": "i32", "HAS_NOISE": "constexpr",
                 "PENALTY_LAST": "constexpr", "TOP_K": "constexpr", "TOP_P": "constexpr", "BLOCK": "constexpr"}
    variants = []
    for (last, top_k, top_p), width in itertools.product(WARM_VARIANTS, (8194, 6563)):
        block = 1 << (width - 1).bit_length()  # draw_rows' triton.next_power_of_2
        variants.append({"HAS_NOISE": False, "PENALTY_LAST": last, "TOP_K": top_k, "TOP_P": top_p, "BLOCK": block,
                         "num_warps": 16 if block >= 8192 else 8})
    built = build_for_h100("gateway.engine.vllm.t3.fused_kernel:_compiled", signature, variants)
    assert len(built) == 2 * len(WARM_VARIANTS) and all(b["cubin"] for b in built), built
