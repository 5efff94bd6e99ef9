"""vLLM's side of T3's fused sampling (``vllm_penalty = "fused"``): a custom logits processor
(vLLM 0.24's ``LogitsProcessor``) over :class:`~gateway.engine.vllm.t3.fused_rows.FusedRows`.

vLLM loads it by name in its engine core (``logits_processors`` of the engine arguments,
``fused_rows.FUSED_PROCESSOR``), so this module imports vLLM and only runs where vLLM does. A
request asks for it through ``SamplingParams.extra_args[fused_rows.FUSED_ARG]`` and comes as
greedy (temperature 0, no penalty, no filters): vLLM applies non-argmax-invariant processors
before its greedy argmax, which then picks the token this processor drew. Other requests pass
untouched and are sampled by vLLM in the same batch.

vLLM 0.24 assumes that a custom processor reads the rows' output ids, and so, under async
scheduling, waits each step for the previous step's tokens to reach the host before sampling
(``logitsprocs_need_output_token_ids``). This one reads only the lengths of those lists:
:func:`~gateway.engine.vllm.t3.fused_rows.spare_output_ids` tells an input batch so (the
plugin installs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from gateway.engine.vllm.t3.fused_rows import FUSED_ARG, FusedRows, RowSampling

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


def requested(params: SamplingParams) -> RowSampling | None:
    value = (params.extra_args or {}).get(FUSED_ARG)
    return None if value is None else RowSampling.from_arg(value)


class FusedT3Sampling(LogitsProcessor):
    reads_output_ids = False
    """Only the output lists' lengths (module docstring): ``fused_rows.spare_output_ids``."""
    kernel: bool | None = None
    """:class:`FusedRows`' ``kernel``: the step as one Triton launch on a CUDA device."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if requested(sampling_params) is not None and sampling_params.temperature != 0:
            raise ValueError(f"a request with {FUSED_ARG} must come as greedy (temperature 0)")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows = FusedRows(vllm_config.scheduler_config.max_num_seqs, vllm_config.model_config.get_vocab_size(),
                              device, pin_memory=is_pin_memory, kernel=self.kernel)
        self.rows.warm_up()  # the kernel's builds made at the engine's start, not in a step

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for slot in batch_update.removed:
            self.rows.remove(slot)
        for slot, params, _prompt_ids, output_ids in batch_update.added:
            self.rows.add(slot, requested(params), output_ids)
        for src, dst, direction in batch_update.moved:
            self.rows.move(src, dst, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.rows.apply(logits)


class EagerFusedT3Sampling(FusedT3Sampling):
    """The same draw as PyTorch operations, without the Triton kernel: the kernel's A/B
    (``benchmark --stages t3step --t3step-penalty fused-eager``)."""

    kernel = False
