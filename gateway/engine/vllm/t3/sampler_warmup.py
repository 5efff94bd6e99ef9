"""The decode batches a family's start runs so that vLLM compiles its sampling kernel then,
not in the middle of a burst of requests.

vLLM 0.24 applies top-k / top-p through a Triton kernel once a decode batch has
:data:`KERNEL_MIN_ROWS` rows or more (``apply_top_k_top_p``; a PyTorch sort below that), and
Triton compiles a kernel the first time each of its specialisations runs: ``TOPK_ENABLED``
and ``TOPP_ENABLED`` are compile-time constants (whether any row of the batch has a top-k,
a top-p below 1), and integer arguments such as the batch size are specialised on whether
they divide by 16. vLLM's own start compiles one variant (its dummy sampler run: both flags
on, ``max_num_seqs`` rows); any other compiles when a served batch first needs it, with the
engine core's thread in the compiler (ptxas) meanwhile and every request in flight waiting
on it. The 256-stream Turbo row of 2026-12-05 (H100) caught the engine thread in Triton's
``make_ptx`` while its first wave waited 13.7 s for first audio.

:func:`warm_variants` says which top-p values give every flag combination a family's requests
can make that reaches the kernel (Turbo: top-k always, top-p below 1 by default or 1 from a
client; the original and Multilingual: no top-k, the kernel only for a client's top-p), and
:func:`warm_rows` the batch sizes that cover both divisibility classes within
``vllm_max_num_seqs``. The engine runs one wave of that many fixed-length requests for each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

KERNEL_MIN_ROWS = 8
"""vLLM 0.24's ``apply_top_k_top_p``: the Triton kernel from this many rows up."""

WARM_ROWS = (9, 16)
"""One batch size of each divisibility class (by 16) at or above :data:`KERNEL_MIN_ROWS`."""

WARM_TOKENS = 24
"""Speech tokens of each warm-up request (fixed length: every row decodes that many steps, so
a wave's requests, prefilled within a few steps, decode together as one batch)."""

TOP_P_CANDIDATES = (0.95, 1.0)
"""Top-p values a client may send besides the family's default (below 1: the kernel's top-p on)."""


def kernel_flags(sampling: Any) -> tuple[bool, bool]:
    """(top-k on, top-p on) of a request's ``T3Sampling``, as vLLM decides them."""
    return sampling.top_k > 0, sampling.top_p < 1.0


def warm_variants(sampling_for: Callable[[float], Any], default_top_p: float) -> list[tuple[float, Any]]:
    """(top-p, sampling), one per flag combination that reaches the kernel: ``sampling_for(top_p)``
    is the family's ``T3Sampling`` for a request with that top-p (a family that ignores a
    client's top-p gives its own whatever is asked)."""
    seen: dict[tuple[bool, bool], tuple[float, Any]] = {}
    for top_p in (default_top_p, *TOP_P_CANDIDATES):
        sampling = sampling_for(top_p)
        flags = kernel_flags(sampling)
        if any(flags) and flags not in seen:
            seen[flags] = (top_p, sampling)
    return list(seen.values())


def warm_rows(max_num_seqs: int, rows: Sequence[int] = WARM_ROWS) -> list[int]:
    """The warm-up batch sizes a scheduler of ``max_num_seqs`` rows can run (a batch it can
    never reach needs no kernel variant)."""
    return [n for n in rows if KERNEL_MIN_ROWS <= n <= max_num_seqs]
