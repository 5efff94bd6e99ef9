"""The fused sampling step of :class:`~gateway.engine.vllm.t3.fused_rows.FusedRows` as one
Triton kernel (issue 18, T3 per step).

At one row T3's step is bounded by the host: every PyTorch operation of the sampling costs the
engine thread its dispatch and launch (~10 us each), and the eager step
(:meth:`FusedRows.apply`, temperature, penalty, min-p, the Gumbel draw, the write-back) is ~20
of them. Here the whole draw of every fused row is one launch: one program per row loads its
logits and seen mask once, and writes back the perturbed logits (whose argmax vLLM's greedy
sampler then takes) and the drawn token (:attr:`FusedRows.last`).

It covers every family's sampling: temperature, repetition penalty, min-p, top-k and top-p
(``TOP_K`` / ``TOP_P``: built in only where some row of the batch asks), in upstream's order
(the penalty after the filters with ``penalty_last``, Turbo's ``inference_turbo``). Top-k and
top-p need no sort: each cut is an order key of the row's float32 values (their bits, flipped
so that unsigned order is the values' order) found bit by bit, 32 counts for the k-th largest
(ties with it stay, as transformers' ``TopKLogitsWarper`` keeps them) and 32 sums of the
renormalised probability above a key for top-p (a token stays while less than ``top_p`` lies
above it: ``TopPLogitsWarper``'s set). The numbers are the eager step's: the same float32
operations in the same order and the same kept sets, so with the same noise the same logits
and token; only top-p's sums run in another order than the eager cumulative sum, so a token
whose mass above it is within rounding of ``top_p`` may fall on the other side
(``tests/engine/vllm/test_fused_kernel.py``, through Triton's interpreter on the CPU).

The noise is the kernel's own: ``q = -log(u)``, ``u`` uniform from Philox (``tl.rand``) keyed
by a per-step seed and the element's index, a fresh stream each step, drawn in the kernel
instead of a separate ``exponential_`` launch; ``u = 0`` (probability 2^-32) gives
``q = inf``, an element that cannot win, never one that must.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 1 << 15
"""The widest row one program holds (T3's speech vocabularies: 8194 and 6563)."""


def _draw_rows(logits_ptr, logits_stride, seen_ptr, seen_stride, params_ptr, params_stride, last_ptr,
               log_noise_ptr, log_noise_stride, seed, width,
               HAS_NOISE: tl.constexpr, PENALTY_LAST: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
               BLOCK: tl.constexpr):
    row = tl.program_id(0)
    fused = tl.load(params_ptr + 3 * params_stride + row)
    if fused > 0:
        temperature = tl.load(params_ptr + row)
        log_min_p = tl.load(params_ptr + params_stride + row)
        penalty = tl.load(params_ptr + 2 * params_stride + row)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=-float("inf")).to(tl.float32)
        x = tl.div_rn(x, temperature)  # torch's division (``/`` is an approximate one on the GPU)
        seen = tl.load(seen_ptr + row * seen_stride + cols, mask=inside, other=0) != 0
        penalised = tl.where(seen, tl.where(x > 0, tl.div_rn(x, penalty), x * penalty), x)
        if PENALTY_LAST:
            last = tl.load(params_ptr + 6 * params_stride + row)
            judged = tl.where(last > 0, x, penalised)
        else:
            judged = penalised
        top = tl.max(judged, axis=0)
        dropped = (judged < top + log_min_p) | (cols >= width)
        if TOP_K or TOP_P:
            # transformers' TopKLogitsWarper then TopPLogitsWarper on what min-p kept, without a
            # sort: each cut is a key found bit by bit (32 counts or sums over the row)
            judged = tl.where(dropped, -float("inf"), judged)
            # unsigned keys in the values' order (the sign bit flipped, or all bits for a negative
            # value; -0.0 made +0.0 first: equal values, equal keys); outside the row: below all
            bits = (judged + 0.0).to(tl.uint32, bitcast=True)
            key = tl.where(cols < width, tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000), 0)
            kept = key >= 0
            if TOP_K:
                k = tl.load(params_ptr + 4 * params_stride + row).to(tl.int32)
                if k > 0:
                    # the k-th largest key: the largest t with at least k keys >= t (ties with it stay)
                    cut = tl.zeros((), dtype=tl.uint32)
                    bit = tl.full((), 0x80000000, tl.uint32)
                    for _ in range(32):
                        trial = cut | bit
                        if tl.sum((key >= trial).to(tl.int32), axis=0) >= k:
                            cut = trial
                        bit = bit >> 1
                    kept = key >= cut
            if TOP_P:
                top_p = tl.load(params_ptr + 5 * params_stride + row)
                if top_p < 1:
                    # a token stays while less than top_p of the (renormalised) probability lies
                    # above it: drop keys <= the largest t whose mass above it is >= top_p
                    weight = tl.where(kept, tl.exp(judged - top), 0.0)
                    need = top_p * tl.sum(weight, axis=0)
                    cut = tl.zeros((), dtype=tl.uint32)
                    bit = tl.full((), 0x80000000, tl.uint32)
                    for _ in range(32):
                        trial = cut | bit
                        if tl.sum(tl.where(key > trial, weight, 0.0), axis=0) >= need:
                            cut = trial
                        bit = bit >> 1
                    kept = kept & (key > cut)  # (the mass above key 0 is all of it: some t qualifies)
            dropped = dropped | ~kept
        if HAS_NOISE:
            log_q = tl.load(log_noise_ptr + row * log_noise_stride + cols, mask=inside, other=0.0)
        else:
            log_q = tl.log(-tl.log(tl.rand(seed, row * width + cols)))
        drawn = tl.where(dropped, -float("inf"), penalised) - log_q
        tl.store(last_ptr + row, tl.argmax(drawn, axis=0).to(tl.int64))
        tl.store(logits_ptr + row * logits_stride + cols, drawn.to(logits_ptr.dtype.element_ty), mask=inside)


_compiled = triton.jit(_draw_rows, do_not_specialize=["logits_stride", "seen_stride", "params_stride",
                                                      "log_noise_stride", "seed", "width"])
"""One build per family (its vocabulary's ``BLOCK``): the seed changes every step, and the
strides and width are the same numbers whatever the batch, so :func:`warm_up`'s small tensors
build the one its steps use."""


def draw_rows(logits: torch.Tensor, seen: torch.Tensor, params: torch.Tensor, last: torch.Tensor, *,
              seed: int, penalty_last: bool, top_k: bool = False, top_p: bool = False,
              log_noise: torch.Tensor | None = None, kernel=None) -> None:
    """Draw the token of every fused row among ``logits``' rows (``params``: the
    :data:`~gateway.engine.vllm.t3.fused_rows.PARAMS` rows, one column per slot): their
    logits become the perturbed ones, ``last`` their token; other rows are left alone.
    ``log_noise``: ``log q``, ``q ~ Exp(1)``, per element instead of the kernel's own (tests). ``kernel``:
    another build of :func:`_draw_rows` (Triton's interpreter, in tests)."""
    rows, width = logits.shape
    if width > MAX_WIDTH:
        raise ValueError(f"a row of {width} logits is wider than the kernel's {MAX_WIDTH}")
    if not (_unit_columns(seen) and _unit_columns(params)):
        raise ValueError(f"the seen mask {seen.stride()} and parameters {params.stride()} need columns one apart")
    if log_noise is not None and (log_noise.shape != logits.shape or not _unit_columns(log_noise)):
        raise ValueError(f"noise of shape {tuple(log_noise.shape)} for logits of {tuple(logits.shape)}")
    work = logits if _unit_columns(logits) else logits.contiguous()  # vLLM's are; a copy where not
    block = triton.next_power_of_2(width)
    (kernel or _compiled)[(rows,)](
        work, work.stride(0), seen, seen.stride(0), params, params.stride(0), last,
        work if log_noise is None else log_noise, 0 if log_noise is None else log_noise.stride(0),
        seed, width, HAS_NOISE=log_noise is not None, PENALTY_LAST=penalty_last, TOP_K=top_k, TOP_P=top_p, BLOCK=block,
        num_warps=16 if block >= 8192 else 8)
    if work is not logits:
        logits.copy_(work)


def _unit_columns(t: torch.Tensor) -> bool:
    """Whether a row's elements lie one apart (a single column: trivially; PyTorch calls a
    ``(7, 1)`` transpose contiguous with a column stride of 7)."""
    return t.shape[1] <= 1 or t.stride(1) == 1


WARM_VARIANTS = ((False, False, False), (False, False, True), (True, True, True), (True, True, False))
"""(penalty last, top-k, top-p) builds made at the start: the original's and Multilingual's
batches (a client's top-p or none), Turbo's (top-k with top-p, or a client's top-p of 1)."""


def warm_up(vocab_size: int, device: torch.device, *, variants=WARM_VARIANTS, kernel=None) -> None:
    """Build the kernel for a ``vocab_size`` row on ``device`` now (an engine's start), not in
    the first step that needs it (Triton compiles each variant at its first launch, ~1 s with
    the engine thread and every request in flight waiting)."""
    for penalty_last, top_k, top_p in variants:
        params = torch.tensor([[1.0], [-float("inf")], [1.0], [1.0], [2.0], [0.5], [float(penalty_last)]],
                              device=device)
        draw_rows(torch.zeros(1, vocab_size, device=device),
                  torch.zeros(1, vocab_size, dtype=torch.bool, device=device), params,
                  torch.zeros(1, dtype=torch.int64, device=device), seed=0, penalty_last=penalty_last,
                  top_k=top_k, top_p=top_p, kernel=kernel)
