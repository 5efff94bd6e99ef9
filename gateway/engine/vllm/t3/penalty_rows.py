"""The repetition penalty with its state kept on the device, row by row (issue 18, T3 per step).

vLLM's own penalty path rebuilds, every decode step, a padded tensor of every row's prompt ids
and one of every row's output ids on the host (``make_tensor_with_pad`` over Python lists),
copies both to the GPU and counts them into two vocabulary-wide masks: host work that grows
with batch x length, and about a dozen small kernels. Measured on an H200 at batch 1 it is
0.84 ms of T3's ~2.55 ms step (docs/benchmarks.md).

:class:`PenaltyRows` keeps one boolean "seen" row per batch slot on the device instead: set
from the prompt ids when a request joins the batch, and from then on only the tokens sampled
since the last step are folded in (one small pinned upload and one ``index_put_`` a step, host
work O(batch), no wait for the device: ``device_rows``). Applying it is two ``where`` over the
logits. The arithmetic is vLLM's
(``apply_repetition_penalties``: a seen token's logit is divided by the penalty when positive,
multiplied when not), so the sampled tokens are the same; which of the two paths serves is
``vllm_penalty`` (docs/operations.md).

Pure PyTorch, no vLLM: the vLLM logits processor that drives it is
:mod:`gateway.engine.vllm.t3.penalty`. Batch bookkeeping follows vLLM's ``BatchUpdate``:
requests are removed, then added (possibly into a freed slot), then moved or swapped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gateway.engine.vllm.t3.device_rows import Marker, mark_row, swap_rows, swap_slots, upload_ids
from gateway.engine.vllm.t3.fused_rows import FUSED_EAGER_PROCESSOR, FUSED_PROCESSOR

PLACEHOLDER = -1
"""vLLM's stand-in for a sampled id not yet copied back to the host (async scheduling)."""
PROCESSOR = "gateway.engine.vllm.t3.penalty:ResidentRepetitionPenalty"
"""The vLLM logits processor that drives :class:`PenaltyRows`, as vLLM loads it by name."""
EXTRA_ARG = "chatterbox_repetition_penalty"
"""The ``SamplingParams.extra_args`` key that carries a request's penalty to it."""


def engine_kwargs(mode: str) -> dict[str, object]:
    """vLLM engine arguments for ``vllm_penalty``: ``resident`` and ``fused`` load their processor
    (``fused-eager``, benchmarks only: the fused one without its Triton kernel)."""
    processor = {"resident": PROCESSOR, "fused": FUSED_PROCESSOR, "fused-eager": FUSED_EAGER_PROCESSOR}.get(mode)
    return {"logits_processors": [processor]} if processor else {}


class PenaltyRows:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str, *, pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory
        self.seen = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=self.device)
        self._marker = Marker(self.device)
        self._penalty_host = [1.0] * max_rows  # uploaded (whole) at the next apply when it changed
        self.penalty = torch.ones(max_rows, dtype=torch.float32, device=self.device)
        self._outputs: dict[int, Sequence[int]] = {}  # slot -> the request's output ids (vLLM's live list)
        self._folded: dict[int, int] = {}  # slot -> how many of them are in ``seen``
        self._penalised: set[int] = set()  # slots whose penalty is not 1
        self._dirty = False

    @property
    def active(self) -> bool:
        """Whether any row in the batch has a penalty (otherwise :meth:`apply` does nothing)."""
        return bool(self._penalised)

    # --- batch bookkeeping ------------------------------------------------------------------

    def add(self, slot: int, penalty: float, prompt_ids: Sequence[int] | None, output_ids: Sequence[int]) -> None:
        """A request takes ``slot``. ``output_ids`` is vLLM's list, which grows as it decodes;
        rows without a penalty (1.0) are tracked all the same, so a later move keeps the rest
        right, but cost nothing to apply."""
        self._outputs[slot] = output_ids
        self._folded[slot] = 0
        self._set_penalty(slot, penalty)
        self.seen[slot].zero_()
        if penalty != 1.0 and prompt_ids:
            ids = [t for t in prompt_ids if 0 <= t < self.vocab_size]
            if ids:
                mark_row(self.seen, slot, self._upload(ids))

    def remove(self, slot: int) -> None:
        self._outputs.pop(slot, None)
        self._folded.pop(slot, None)
        self._set_penalty(slot, 1.0)

    def move(self, src: int, dst: int, *, swap: bool) -> None:
        """vLLM moved the request in ``src`` to ``dst`` (``swap``: and the one in ``dst`` to ``src``)."""
        if swap:
            swap_rows(self.seen, src, dst)
            swap_slots((self._outputs, self._folded), src, dst)
            p_src, p_dst = self._penalty_host[src], self._penalty_host[dst]
            self._set_penalty(src, p_dst)
            self._set_penalty(dst, p_src)
            return
        self.seen[dst] = self.seen[src]
        for table in (self._outputs, self._folded):
            value = table.pop(src, None)
            table.pop(dst, None)
            if value is not None:
                table[dst] = value  # type: ignore[assignment]
        self._set_penalty(dst, self._penalty_host[src])
        self._set_penalty(src, 1.0)

    # --- each step ----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold in the ids sampled since the last call, then penalise every seen id of the
        first ``logits.shape[0]`` rows (vLLM's arithmetic)."""
        if not self._penalised:
            return logits
        self._fold_new_outputs()
        if self._dirty:
            # a tensor of its own: the next bookkeeping may change the host row before the upload ends
            staged = torch.tensor(self._penalty_host, dtype=torch.float32)
            if self.pin_memory and self.device.type != "cpu":
                staged = staged.pin_memory()
            self.penalty.copy_(staged, non_blocking=True)
            self._dirty = False
        rows, width = logits.shape[0], min(logits.shape[1], self.vocab_size)
        penalty = self.penalty[:rows].unsqueeze(1)
        view = logits[:, :width]
        penalised = torch.where(view > 0, view / penalty, view * penalty)
        logits[:, :width] = torch.where(self.seen[:rows, :width], penalised, view)
        return logits

    def _fold_new_outputs(self) -> None:
        slots: list[int] = []
        ids: list[int] = []
        for slot in self._penalised:
            outputs, done = self._outputs.get(slot), self._folded.get(slot, 0)
            if outputs is None:
                continue
            end = done
            for token in outputs[done:]:
                if token == PLACEHOLDER:
                    break  # not on the host yet: folded at a later step, in order
                if 0 <= token < self.vocab_size:
                    slots.append(slot)
                    ids.append(token)
                end += 1
            self._folded[slot] = end
        if ids:
            self._marker.mark(self.seen, self._upload(slots), self._upload(ids))

    def _set_penalty(self, slot: int, penalty: float) -> None:
        self._penalty_host[slot] = penalty
        if penalty != 1.0:
            self._penalised.add(slot)
        else:
            self._penalised.discard(slot)
        self._dirty = True

    def _upload(self, values: list[int]) -> torch.Tensor:
        return upload_ids(values, self.device, pin_memory=self.pin_memory)
