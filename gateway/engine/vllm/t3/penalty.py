"""vLLM's side of the device-resident repetition penalty (``vllm_penalty = "resident"``): a
custom logits processor (vLLM 0.24's ``LogitsProcessor``) over
:class:`~gateway.engine.vllm.t3.penalty_rows.PenaltyRows`.

vLLM loads it by name in its engine core (``logits_processors`` of the engine arguments, see
``penalty_rows.PROCESSOR``), so this module imports vLLM and only runs where vLLM does. A request asks
for it through ``SamplingParams.extra_args[penalty_rows.EXTRA_ARG]`` (its penalty) with vLLM's own
``repetition_penalty`` left at 1.0, so that vLLM's sampler skips its penalty path altogether;
requests without the argument pass untouched. vLLM applies non-argmax-invariant processors just
before its own penalties, so the penalty keeps its place in the sampler's order. A custom
processor also makes vLLM keep each row's output ids current on the host (async scheduling's
placeholders replaced before sampling), which is where the new ids are read from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from gateway.engine.vllm.t3.penalty_rows import EXTRA_ARG, PenaltyRows

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


def requested_penalty(params: SamplingParams) -> float:
    extra = params.extra_args or {}
    return float(extra.get(EXTRA_ARG, 1.0))


class ResidentRepetitionPenalty(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        penalty = requested_penalty(sampling_params)
        if not penalty > 0:
            raise ValueError(f"{EXTRA_ARG} must be positive, got {penalty}")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows = PenaltyRows(vllm_config.scheduler_config.max_num_seqs, vllm_config.model_config.get_vocab_size(),
                                device, pin_memory=is_pin_memory)

    def is_argmax_invariant(self) -> bool:
        return False  # a penalty can change the greedy pick

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for slot in batch_update.removed:
            self.rows.remove(slot)
        for slot, params, prompt_ids, output_ids in batch_update.added:
            self.rows.add(slot, requested_penalty(params), prompt_ids, output_ids)
        for src, dst, direction in batch_update.moved:
            self.rows.move(src, dst, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.rows.apply(logits)

