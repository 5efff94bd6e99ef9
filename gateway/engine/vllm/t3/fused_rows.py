"""T3's whole sampling step on the device, row by row (``vllm_penalty = "fused"``; issue 18,
T3 per step).

vLLM's sampler turns a T3 row's logits into a token in many small steps, each with host work:
the repetition penalty rebuilds every row's prompt and output ids on the host every step
(``make_tensor_with_pad``) and, under async scheduling, first waits for the previous step's
tokens to reach the host; then temperature, min-p, a softmax and the random draw. Measured
on an H200 (``benchmark --stages t3step``): 3.13 ms a step at one row served as upstream
samples (temperature 0.8, min-p 0.05, repetition 1.2), 2.54 without the penalty, 1.91 greedy
(an argmax and nothing else); 10.57 / 7.95 / 7.10 ms at 128 rows.

:class:`FusedRows` does the sampling of the rows that ask for it itself, in a handful of
device kernels and no host copy, and hands vLLM logits whose argmax *is* the drawn token; the
request goes to vLLM as greedy (temperature 0, no penalty, no filters), so vLLM's part is its
cheapest path. Per row, in upstream's order for its family:

1. temperature: the logits divided by it;
2. repetition penalty: a seen token's logit divided by the penalty when positive, multiplied
   when not (vLLM's ``apply_repetition_penalties``; transformers' processor likewise). It
   commutes with 1 (a positive scale), so "penalty, then temperature" is the same numbers;
3. the filters, judging the penalised logits (upstream ``T3.inference``: the original and
   Multilingual) or, with ``penalty_last``, the logits before the penalty (upstream
   ``inference_turbo``: temperature, top-k, top-p, then the penalty; vLLM's sampler would put
   the penalty first): min-p (a token whose probability is below ``min_p`` times the most
   likely one's goes, tested in log space: ``logit < max + log(min_p)``), top-k (all but the
   k largest, ties with the k-th kept, as transformers' ``TopKLogitsWarper``), top-p (from
   the top, a token stays while less than ``top_p`` of the probability lies above it: the
   same set as transformers' ``TopPLogitsWarper``). Top-k and top-p come from one sorted
   ``topk`` of the batch (the largest k, or whole rows where one has top-p without top-k), and
   only when some row asks (:class:`Filters`, read on the host when the batch changes);
4. the draw: the Gumbel-max trick as vLLM's own random sampler does it (``argmax(p / q)`` with
   ``q ~ Exp(1)``, here ``logit - log(q)``) over the penalised logits the filters kept, so
   the token follows ``softmax`` of upstream's processed logits.

The seen ids need no host copy either: the token a row drew is kept on the device, and folded
into the row's seen mask at the next step if vLLM kept it, i.e. if the request's output list
(vLLM's live list, which grows by one id or placeholder per kept token) has grown since. A
row whose draw vLLM discards (a chunked prefill not yet at its end) therefore never marks a
token. Prompt ids are not folded: a T3 prompt's placeholder ids (``layout``) and its
start-of-speech token are all masked to ``-inf`` by the head, where a penalty changes nothing.
A request that joins with output ids already (resumed after preemption) has them folded then.

Rows that do not ask (a seeded request, a greedy one) are left untouched and go vLLM's way in
the same batch. Pure PyTorch, no vLLM: the vLLM logits
processor around it is :mod:`gateway.engine.vllm.t3.fused`. Batch bookkeeping follows vLLM's
``BatchUpdate`` (removed, then added, then moved or swapped), as :mod:`penalty_rows` does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gateway.engine.vllm.t3.device_rows import Marker, mark_row, swap_rows, swap_slots, upload_ids

log = logging.getLogger(__name__)

FUSED_PROCESSOR = "gateway.engine.vllm.t3.fused:FusedT3Sampling"
"""The vLLM logits processor that drives :class:`FusedRows`, as vLLM loads it by name."""
FUSED_EAGER_PROCESSOR = "gateway.engine.vllm.t3.fused:EagerFusedT3Sampling"
"""The same without the Triton kernel (benchmarks only)."""
FUSED_ARG = "chatterbox_fused_sampling"
"""The ``SamplingParams.extra_args`` key: :meth:`RowSampling.to_arg`."""


@dataclass(frozen=True, slots=True)
class RowSampling:
    """What one row's draw needs. ``top_k`` 0 and ``top_p`` 1: off. ``penalty_last``: the
    repetition penalty after the filters (upstream ``inference_turbo``: temperature, top-k,
    top-p, penalty), not before them (upstream ``T3.inference``: penalty, temperature, min-p,
    top-p; vLLM's order for every request)."""

    temperature: float
    min_p: float
    repetition_penalty: float
    top_k: int = 0
    top_p: float = 1.0
    penalty_last: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"fused sampling needs a positive temperature, got {self.temperature}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k < 1 << 24):  # exact in the float32 row
            raise ValueError(f"top_k must be an integer in [0, 2^24), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def to_arg(self) -> list[float]:
        return [float(self.temperature), float(self.min_p), float(self.repetition_penalty), float(self.top_k),
                float(self.top_p), float(self.penalty_last)]

    @classmethod
    def from_arg(cls, value: object) -> RowSampling:
        if not isinstance(value, (list, tuple)) or len(value) != 6:
            raise ValueError(f"{FUSED_ARG} must be [temperature, min_p, repetition_penalty, top_k, top_p, "
                             f"penalty_last], got {value!r}")
        temperature, min_p, penalty, top_k, top_p, last = (float(v) for v in value)
        if top_k != int(top_k) or last not in (0.0, 1.0):
            raise ValueError(f"{FUSED_ARG}: top_k must be whole and penalty_last 0 or 1, got {value!r}")
        return cls(temperature, min_p, penalty, int(top_k), top_p, bool(last))

    def row(self) -> list[float]:
        """The row's column of :class:`FusedRows`' parameters (:data:`PARAMS`)."""
        log_min_p = math.log(self.min_p) if self.min_p > 0 else -math.inf
        return [self.temperature, log_min_p, self.repetition_penalty, 1.0, float(self.top_k), self.top_p,
                float(self.penalty_last)]


def fusable(*, temperature: float, seed: int | None) -> bool:
    """Whether a request's sampling is what :class:`FusedRows` draws: a random draw (greedy
    stays greedy) and no seed (a seeded request's tokens must repeat exactly, from vLLM's
    per-request generator)."""
    return temperature > 0 and seed is None


PARAMS = ("temperature", "log_min_p", "penalty", "fused", "top_k", "top_p", "penalty_last")
"""The rows of :class:`FusedRows`' parameters, one column per batch slot."""
NEUTRAL = (1.0, -math.inf, 1.0, 0.0, 0.0, 1.0, 0.0)
"""A row vLLM samples: temperature 1, nothing dropped, penalty 1, not fused."""


@dataclass(frozen=True, slots=True)
class Filters:
    """Which filters the fused rows need (read on the host, from their parameters' host copy,
    whenever the batch changes): the step skips what none asks for."""

    top_k: int = 0
    """The largest top-k of a fused row (0: none has one)."""
    top_p: bool = False
    full_sort: bool = False
    """Some row has top-p without top-k: its whole row is sorted."""
    penalty_last: bool = False

    @classmethod
    def of(cls, rows: list[list[float]]) -> Filters:
        """From the fused rows' parameters (:data:`PARAMS`, host lists)."""
        k, p, last = PARAMS.index("top_k"), PARAMS.index("top_p"), PARAMS.index("penalty_last")
        return cls(top_k=int(max((r[k] for r in rows), default=0)), top_p=any(r[p] < 1 for r in rows),
                   full_sort=any(r[p] < 1 and r[k] == 0 for r in rows), penalty_last=any(r[last] > 0 for r in rows))


_SEED_SPAN = 1 << 31


def _kernel_fits(vocab_size: int) -> bool:
    """Whether the Triton kernel can draw a row of ``vocab_size`` (Triton importable, the row
    within one program); otherwise every step is the eager one."""
    try:
        from gateway.engine.vllm.t3.fused_kernel import MAX_WIDTH
    except ImportError:
        return False
    return vocab_size <= MAX_WIDTH


def exponential_noise(like: torch.Tensor) -> torch.Tensor:
    """``q ~ Exp(1)`` of ``like``'s shape, from the device's default generator."""
    return torch.empty_like(like).exponential_()


class FusedRows:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str, *, pin_memory: bool = False,
                 noise: Callable[[torch.Tensor], torch.Tensor] = exponential_noise, kernel: Any = None) -> None:
        """``kernel``: whether a step runs as one Triton launch
        (:mod:`~gateway.engine.vllm.t3.fused_kernel`) instead of the eager operations; None: on
        a CUDA device. Another build of the kernel (Triton's interpreter) runs it anywhere
        (tests). ``noise``: the eager step's ``q ~ Exp(1)``; any other than the default is
        handed to the kernel too, which otherwise draws its own."""
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory
        self.noise = noise
        if kernel is None:
            kernel = self.device.type == "cuda" and _kernel_fits(vocab_size)
        self._kernel = kernel
        self.kernel_error: str | None = None
        """Why the kernel was given up (:meth:`give_up_kernel`); every step since is eager."""
        self._seed = torch.initial_seed() % _SEED_SPAN  # the kernel's Philox key (as seeded): one more each step
        self.seen = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=self.device)
        self.last = torch.zeros(max_rows, dtype=torch.int64, device=self.device)
        """The token each row drew at the last :meth:`apply` (folded next step if vLLM kept it)."""
        self._marker = Marker(self.device)
        # per-row parameters (:data:`PARAMS`): host lists, uploaded whole when they change; a
        # row vLLM samples holds the neutral ones
        self._host = [list(NEUTRAL) for _ in range(max_rows)]  # slot -> its parameters (:data:`PARAMS`)
        self._params = self._staged().to(self.device)  # (PARAMS, slots)
        self._dirty = False
        self._filters = Filters()
        self._outputs: dict[int, Sequence[int]] = {}  # fused slot -> its output ids (vLLM's live list)
        self._kept: dict[int, int] = {}  # fused slot -> how long that list was at the last apply
        self._kept_key: tuple[int, ...] = ()
        self._kept_slots: torch.Tensor | None = None  # the upload of ``_kept_key``: decode steps repeat it

    @property
    def uses_kernel(self) -> bool:
        """Whether a step is the Triton kernel's."""
        return self._kernel is not False

    def warm_up(self) -> None:
        """Build the kernel's variants now (an engine's start), not in the first step that
        needs each; a device Triton cannot build for leaves the eager step (:meth:`give_up_kernel`)."""
        if not self.uses_kernel:
            return
        from gateway.engine.vllm.t3.fused_kernel import warm_up

        try:
            warm_up(self.vocab_size, self.device, kernel=self._build)
        except Exception as exc:  # noqa: BLE001 - the eager step serves instead
            self.give_up_kernel(exc)

    @property
    def _build(self) -> Any:
        """The kernel build to launch: None for the compiled one, else the one given (tests)."""
        return None if self._kernel is True else self._kernel

    def give_up_kernel(self, exc: BaseException) -> None:
        """The kernel failed before it ran (a build or a launch the device refused: its checks
        and Triton's compiler come first): this step and every later one take the eager
        operations, the same draw, instead of failing the engine and every request in it."""
        self.kernel_error = f"{type(exc).__name__}: {exc}"
        self._kernel = False
        log.warning("fused sampling: the Triton kernel failed (%s); the eager step from now on", self.kernel_error)

    @property
    def active(self) -> bool:
        """Whether any row draws here (otherwise :meth:`apply` does nothing)."""
        return bool(self._outputs)

    # --- batch bookkeeping ------------------------------------------------------------------

    def add(self, slot: int, sampling: RowSampling | None, output_ids: Sequence[int]) -> None:
        """A request takes ``slot``; ``sampling`` None: it is vLLM's to sample."""
        self.remove(slot)
        if sampling is None:
            return
        self._outputs[slot] = output_ids
        self._kept[slot] = len(output_ids)
        self._set(slot, sampling)
        self.seen[slot].zero_()
        ids = [t for t in output_ids if 0 <= t < self.vocab_size]  # resumed: what it had made (placeholders: < 0)
        if ids:
            mark_row(self.seen, slot, self._upload(ids))

    def remove(self, slot: int) -> None:
        self._kept.pop(slot, None)
        if self._outputs.pop(slot, None) is not None:
            self._host[slot] = list(NEUTRAL)
            self._dirty = True

    def move(self, src: int, dst: int, *, swap: bool) -> None:
        """vLLM moved the request in ``src`` to ``dst`` (``swap``: and the one in ``dst`` to ``src``)."""
        if swap:
            swap_rows(self.seen, src, dst)
            swap_rows(self.last, src, dst)
            self._host[src], self._host[dst] = self._host[dst], self._host[src]
            swap_slots((self._outputs, self._kept), src, dst)
        else:
            self.remove(dst)
            if src not in self._outputs:
                return
            self.seen[dst] = self.seen[src]
            self.last[dst] = self.last[src]
            self._host[dst] = self._host[src]
            self._outputs[dst] = self._outputs.pop(src)
            self._kept[dst] = self._kept.pop(src)
            self._host[src] = list(NEUTRAL)
        self._dirty = True

    # --- each step ----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold in last step's kept draws, then draw this step's token of every fused row among
        the first ``logits.shape[0]``: their logits come back with that token as the argmax
        (the others untouched)."""
        if not self._outputs:
            return logits
        rows, width = logits.shape[0], logits.shape[1]
        if width > self.vocab_size:
            raise ValueError(f"logits of width {width} against a vocabulary of {self.vocab_size}")
        self._fold_kept()
        if self._dirty:
            staged = self._staged()  # a tensor of its own: the next bookkeeping may change the rows meanwhile
            if self.pin_memory and self.device.type != "cpu":
                staged = staged.pin_memory()
            self._params.copy_(staged, non_blocking=True)
            self._filters = Filters.of([self._host[slot] for slot in self._outputs])
            self._dirty = False
        if self.uses_kernel:
            try:
                self._draw_in_kernel(logits)
                return logits
            except Exception as exc:  # noqa: BLE001 - nothing ran: the eager step below draws instead
                self.give_up_kernel(exc)
        temperature, log_min_p, penalty, fused, top_k, top_p, last = (p[:rows, None] for p in self._params)
        x = logits.float() / temperature  # temperature and penalty commute (a positive scale)
        penalised = torch.where(self.seen[:rows, :width], torch.where(x > 0, x / penalty, x * penalty), x)
        # the filters judge the penalised logits (upstream's original), or the plain ones where
        # the penalty comes after them (Turbo); either way the draw is from the penalised ones
        judged = torch.where(last > 0, x, penalised) if self._filters.penalty_last else penalised
        judged = judged.masked_fill(judged < judged.amax(dim=1, keepdim=True) + log_min_p, -math.inf)
        if self._filters.top_k or self._filters.top_p:
            judged = self._top_k_top_p(judged, top_k, top_p)
        # what the filters kept, penalised (without penalty_last, ``judged`` is exactly that)
        x = penalised.masked_fill(judged == -math.inf, -math.inf) if self._filters.penalty_last else judged
        x = x - self.noise(x).log()
        on = fused > 0
        self.last[:rows] = torch.where(on[:, 0], x.argmax(dim=1), self.last[:rows])
        logits.copy_(torch.where(on, x, logits.float()))
        return logits

    def _draw_in_kernel(self, logits: torch.Tensor) -> None:
        from gateway.engine.vllm.t3.fused_kernel import draw_rows

        self._seed = (self._seed + 1) % _SEED_SPAN
        log_noise = None if self.noise is exponential_noise else self.noise(logits.float()).log()
        filters = self._filters
        draw_rows(logits, self.seen, self._params, self.last, seed=self._seed, penalty_last=filters.penalty_last,
                  top_k=filters.top_k > 0, top_p=filters.top_p, log_noise=log_noise, kernel=self._build)

    def _top_k_top_p(self, judged: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper`` (as upstream applies
        them) on each row's ``judged`` logits, from one sorted ``topk`` of the batch: the
        largest k of all rows, or the whole row where one has top-p without top-k."""
        width = judged.shape[1]
        take = width if self._filters.full_sort else min(self._filters.top_k, width)
        values = judged.topk(take, dim=1).values  # descending
        k = top_k.long().clamp(max=take)
        with_k = k > 0
        inf = torch.full_like(values[:, :1], -math.inf)
        cut_k = torch.where(with_k, values.gather(1, (k - 1).clamp(min=0)), inf)  # ties with the k-th stay
        if not self._filters.top_p:
            return judged.masked_fill(judged < cut_k, -math.inf)
        kept = values.masked_fill(with_k & (torch.arange(take, device=values.device) >= k), -math.inf)
        probs = kept.softmax(dim=1)
        before = probs.cumsum(dim=1) - probs  # the probability of every token above this one
        # a token stays while less than top_p lies above it (the first always): transformers'
        # "ascending cumulative probability <= 1 - top_p goes", counted from the top
        n = (before < top_p).sum(dim=1, keepdim=True).clamp(min=1)
        cut_p = torch.where(top_p < 1, kept.gather(1, n - 1), inf)
        return judged.masked_fill(judged < torch.maximum(cut_k, cut_p), -math.inf)

    def _fold_kept(self) -> None:
        kept: list[int] = []
        for slot, outputs in self._outputs.items():
            n = len(outputs)
            if n > self._kept[slot]:
                kept.append(slot)
                self._kept[slot] = n
        if kept:
            key = tuple(kept)
            if key != self._kept_key or self._kept_slots is None:
                self._kept_key, self._kept_slots = key, self._upload(kept)
            slots = self._kept_slots
            self._marker.mark(self.seen, slots, self.last[slots])

    def _set(self, slot: int, sampling: RowSampling) -> None:
        self._host[slot] = sampling.row()
        self._dirty = True

    def _upload(self, values: list[int]) -> torch.Tensor:
        return upload_ids(values, self.device, pin_memory=self.pin_memory)

    def _staged(self) -> torch.Tensor:
        # one column per slot, a row's columns one apart even with one slot (``.T.contiguous()``
        # keeps a (PARAMS, 1) transpose's column stride of len(PARAMS))
        staged = torch.empty(len(PARAMS), len(self._host), dtype=torch.float32)
        staged.copy_(torch.tensor(self._host, dtype=torch.float32).T)
        return staged


def spare_output_ids(input_batch: Any) -> None:
    """Turn off ``input_batch``'s wait for output ids if every custom processor in it is one
    that does not read them (``reads_output_ids = False``) and nothing else asked for them
    (a reasoning parser's budget). vLLM's builtin processors never need them."""
    procs = getattr(input_batch, "logitsprocs", None)
    if procs is None or not getattr(input_batch, "logitsprocs_need_output_token_ids", False):
        return
    if getattr(input_batch, "thinking_budget_state_holder", None) is not None:
        return
    custom = [p for p in procs.all if not type(p).__module__.startswith("vllm.")]
    if custom and all(getattr(p, "reads_output_ids", True) is False for p in custom):
        input_batch.logitsprocs_need_output_token_ids = False
