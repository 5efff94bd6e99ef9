"""Turbo's mean-flow S3Gen solve (2 steps, no CFG) in the same machinery as the original's.

Upstream ``CausalConditionalCFM.forward(..., meanflow=True)`` runs ``basic_euler``: a linear
time grid ``t_0 = 0 < t_1 < ... < t_n = 1`` (no cosine schedule), and at each step one
estimator call on the batch itself (no conditional/unconditional doubling) with the step's
start time ``t`` *and* end time ``r``: the distilled estimator embeds both
(``time_mlp(time_embeddings(.))`` of each) and mixes them with ``time_embed_mixer``; then
``x += (r - t) v``. Its estimator also rebuilds the attention masks at every step through
the host-synchronising mask helper, as the original's does.

:class:`MeanFlowSolver` computes the same function as a :class:`~gateway.engine.vllm.cfm_solver.CfmSolver`
whose per-batch work (attention biases, the mixed time embedding of every step: a constant
of the model) is done once and whose estimator body is the shared ``estimator_forward``.
It overrides only :meth:`prepare` and :meth:`advance`, the per-solve and per-step parts of
the solve ``CfmSolver`` runs and captures (and ``mirrors``, which estimator that is), so on
CUDA the whole solve is one CUDA graph per bucketed ``(rows, frames)`` shape exactly as the
original's, replayed by the inherited ``solve``/``capture``; padding rows and frames are
masked the same way, and the estimator's blocks run through the same plain or
``torch.compile``'d functions (``vocoder_compile``) and attention (``vocoder_attention``).
Half the estimator rows of the original's CFG solve and a fifth of its steps: a tenth of the
estimator work per window.

:func:`flow_solver` picks the solver a flow decoder needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gateway.engine.vllm.cfm_solver import CfmSolver, Prepared, estimator_forward, packed_inputs, plain_causal_block


def is_meanflow(decoder: torch.nn.Module) -> bool:
    """True for S3Gen's distilled mean-flow decoder (``S3Gen(meanflow=True)``, Turbo)."""
    return bool(getattr(decoder.estimator, "meanflow", False))


class MeanFlowSolver(CfmSolver):
    """The mean-flow solve for padded batches; blocking, one worker thread only (as CfmSolver)."""

    def __init__(self, decoder: torch.nn.Module, *, steps: int, device: torch.device | str,
                 dtype: torch.dtype, **options: Any) -> None:
        if not is_meanflow(decoder):
            raise ValueError("MeanFlowSolver needs S3Gen's mean-flow decoder (S3Gen(meanflow=True))")
        super().__init__(decoder, steps=steps, device=device, dtype=dtype, **options)
        if not self.mirrored:
            raise ValueError("this mean-flow estimator is not the causal U-Net estimator_forward mirrors")
        self.cfg_rate = 0.0  # distilled with CFG: none at inference (upstream basic_euler)

    @staticmethod
    def mirrors(est: torch.nn.Module) -> bool:
        """The mean-flow estimator is the original's U-Net plus the (t, r) mixer: its body is
        ``estimator_forward``'s (so its blocks may be compiled as the original's)."""
        return (getattr(est, "meanflow", False) and getattr(est, "causal", False) and len(est.down_blocks) >= 1
                and est.time_embed_mixer is not None and plain_causal_block(est.final_block))

    def time_span(self) -> torch.Tensor:
        """Upstream: ``linspace(0, 1, steps + 1)`` in the flow dtype, never the cosine schedule."""
        return torch.linspace(0, 1, self.steps + 1, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def step_embeddings(self) -> torch.Tensor:
        """(steps, E): each step's mixed (t, r) time embedding, as the estimator computes it.
        A constant of the model and the step count: computed once, outside any graph."""
        est, dt = self.est, self.dtype
        t = est.time_mlp(est.time_embeddings(self.t_span[:-1]).to(dt))
        r = est.time_mlp(est.time_embeddings(self.t_span[1:]).to(dt))
        return est.time_embed_mixer(torch.cat([t, r], dim=1))

    def prepare(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor) -> Prepared:
        """The rows themselves (no CFG doubling) and their attention's biases or keys."""
        return Prepared(mask, packed_inputs(mu, spks, cond), self.attention_biases(mask))

    def advance(self, x: torch.Tensor, prep: Prepared, tprojs: Sequence[torch.Tensor], dt: torch.Tensor) -> torch.Tensor:
        """One mean-flow step: ``x + (r - t) v(x | t, r)`` (``tprojs``: the step's mixed
        time projections, ``dt``: its length)."""
        return x + dt * estimator_forward(self.est, x, prep.mask, prep.inputs, tprojs, prep.biases, self.weights,
                                          self.blocks)


def flow_solver(decoder: torch.nn.Module, **options: Any) -> CfmSolver:
    """The CFM solver for ``decoder`` (``options``: CfmSolver's keywords): mean-flow (Turbo)
    or the original's CFG Euler solve."""
    cls = MeanFlowSolver if is_meanflow(decoder) else CfmSolver
    return cls(decoder, **options)
