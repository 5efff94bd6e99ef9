"""The reference T3 decode loop: upstream ``T3.inference`` step for step, but stoppable.

Upstream ``T3.inference`` loops over ``max_new_tokens`` with no way to stop it from outside,
so a cancelled request would run to the end. This loop drives the same upstream submodules
(``prepare_input_embeds``, the Llama backbone with its KV cache, ``speech_emb``,
``speech_pos_emb``, ``speech_head``) and the same logits processors in the same order, and
checks a ``should_stop`` callback before every step. With the same torch RNG state it samples
exactly the tokens upstream samples (tests/engine/reference/test_reference_engine.py checks this), which makes
it the parity baseline for the vLLM engine.

Quirks kept on purpose, because the model was trained/served that way upstream:
- the start-of-speech token is fed twice (once inside ``prepare_input_embeds``, once as the
  first decode input, both at speech position 0);
- the repetition penalty sees the start-of-speech id among the generated ids;
- CFG: ``cond + w * (cond - uncond)`` on logits, the unconditional row having zeroed text
  embeddings (text positions kept).

:func:`generate_turbo_tokens` does the same for Turbo's ``T3.inference_turbo`` (GPT-2
backbone, no CFG, no learned positions), with its own quirks kept: logits processors in the
order temperature, top-k, top-p, repetition penalty; the first step's repetition penalty
sees the start-of-speech id, later steps only the generated ids; the stop token is not
checked after the first step.

Multilingual runs :func:`generate_speech_tokens` like the original. Upstream 0.1.7 also hooks
an ``AlignmentStreamAnalyzer`` into the multilingual loop (attention weights of layer 9, to
force a stop on hallucinated tails); we do not: it needs eager attention with attention
outputs at every step (which vLLM does not expose, so the engines would disagree), upstream
has since removed it, and our generation is bounded by ``max_speech_tokens`` per chunk.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE, drop_invalid_tokens
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.cond_enc import T3Cond
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class DecodeCancelled(Exception):
    """``should_stop`` said stop; the partial tokens are discarded."""


@dataclass(frozen=True, slots=True)
class Sampling:
    cfg_weight: float = 0.5
    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    top_k: int = 0
    """Turbo only (upstream fixes it at 1000); 0: off."""


def cache_kwarg(backbone: torch.nn.Module) -> str:
    # transformers 5.x renames past_key_values -> cache (the old name warns on every call).
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_speech_tokens(
    t3: T3,
    t3_cond: T3Cond,
    text_ids: torch.Tensor,
    sampling: Sampling,
    *,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Raw sampled speech ids, shape (1, n), the stop token included when it was sampled.

    ``text_ids``: (1, L) with start/stop text tokens. ``t3_cond`` is consumed (T3 caches the
    prompt embedding in it): pass a fresh one per call. ``should_stop`` is checked before each
    step and raises :class:`DecodeCancelled`; ``on_step(i)`` is called after step ``i``.
    """
    hp = t3.hp
    device = t3.device
    use_cfg = sampling.cfg_weight > 0.0
    # Upstream always runs a CFG pair; with weight 0 the unconditional row cannot change the
    # result, so it is skipped (upstream would even fail on the batch-of-one embeddings).
    text = text_ids.to(device=device, dtype=torch.long)
    if use_cfg:
        text = torch.cat([text, text], dim=0)
    rows = text.size(0)
    start = torch.full((rows, 1), hp.start_speech_token, dtype=torch.long, device=device)
    embeds, _ = t3.prepare_input_embeds(
        t3_cond=t3_cond.to(device=device), text_tokens=text, speech_tokens=start, cfg_weight=sampling.cfg_weight
    )
    bos = t3.speech_emb(start[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)
    inputs = torch.cat([embeds, bos.expand(rows, -1, -1)], dim=1)

    repetition = RepetitionPenaltyLogitsProcessor(penalty=float(sampling.repetition_penalty))
    min_p = MinPLogitsWarper(min_p=sampling.min_p)
    top_p = TopPLogitsWarper(top_p=sampling.top_p)
    cache = DynamicCache(config=t3.cfg)
    cache_kw = cache_kwarg(t3.tfmr)
    generated = start[:1].clone()
    predicted: list[torch.Tensor] = []
    max_new_tokens = min(max_new_tokens, hp.max_speech_tokens)  # learned positions end there
    for step in range(max_new_tokens):
        if should_stop is not None and should_stop():
            raise DecodeCancelled
        hidden = t3.tfmr(inputs_embeds=inputs, use_cache=True, **{cache_kw: cache}).last_hidden_state
        logits = t3.speech_head(hidden[:, -1, :])
        if use_cfg:
            cond, uncond = logits[0:1], logits[1:2]
            logits = cond + sampling.cfg_weight * (cond - uncond)
        logits = repetition(generated, logits)
        if sampling.temperature != 1.0:
            logits = logits / sampling.temperature
        logits = min_p(generated, logits)
        logits = top_p(generated, logits)
        token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
        predicted.append(token)
        generated = torch.cat([generated, token], dim=1)
        if on_step is not None:
            on_step(step)
        if int(token) == hp.stop_speech_token:
            break
        embed = t3.speech_emb(token) + t3.speech_pos_emb.get_fixed_embedding(step + 1)
        inputs = embed.expand(rows, -1, -1)
    if not predicted:
        return torch.zeros((1, 0), dtype=torch.long, device=device)
    return torch.cat(predicted, dim=1)


def turbo_processors(sampling: Sampling) -> LogitsProcessorList:
    """Upstream ``inference_turbo``'s processors, in its order."""
    processors = LogitsProcessorList()
    if sampling.temperature > 0 and sampling.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    return processors


@torch.inference_mode()
def generate_turbo_tokens(
    t3: T3,
    t3_cond: T3Cond,
    text_ids: torch.Tensor,
    sampling: Sampling,
    *,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Turbo's raw sampled speech ids, shape (1, n), the stop token included when sampled.

    Upstream ``inference_turbo(max_gen_len=m)`` samples up to ``m + 1`` tokens; this samples
    up to ``max_new_tokens`` (the same tokens for ``max_new_tokens = m + 1``).
    """
    hp = t3.hp
    device = t3.device
    text = text_ids.to(device=device, dtype=torch.long)
    start = torch.full((1, 1), hp.start_speech_token, dtype=torch.long, device=device)
    embeds, _ = t3.prepare_input_embeds(t3_cond=t3_cond.to(device=device), text_tokens=text, speech_tokens=start, cfg_weight=0.0)
    processors = turbo_processors(sampling)
    cache = DynamicCache(config=t3.cfg)
    cache_kw = cache_kwarg(t3.tfmr)
    inputs = embeds
    history = start
    predicted: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if should_stop is not None and should_stop():
            raise DecodeCancelled
        hidden = t3.tfmr(inputs_embeds=inputs, use_cache=True, **{cache_kw: cache})[0]
        logits = processors(history, t3.speech_head(hidden[:, -1:])[:, -1, :])
        if step > 0 and torch.all(logits == -float("inf")):
            break
        token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
        predicted.append(token)
        history = torch.cat(predicted, dim=1)
        if on_step is not None:
            on_step(step)
        if step > 0 and int(token) == hp.stop_speech_token:
            break
        inputs = t3.speech_emb(token)
    if not predicted:
        return torch.zeros((1, 0), dtype=torch.long, device=device)
    return torch.cat(predicted, dim=1)


def turbo_speech_tokens(raw: torch.Tensor) -> torch.Tensor:
    """What upstream Turbo hands S3Gen: every id below the speech vocabulary (stop and
    special ids dropped); the engine then appends S3Gen's silence tokens."""
    tokens = raw[0] if raw.dim() == 2 else raw
    return tokens[tokens < SPEECH_VOCAB_SIZE]


def valid_speech_tokens(raw: torch.Tensor) -> torch.Tensor:
    """What upstream ``generate`` hands S3Gen: ids before the stop token, special ids dropped."""
    tokens = drop_invalid_tokens(raw[0] if raw.dim() == 2 else raw)
    return tokens[tokens < SPEECH_VOCAB_SIZE]
