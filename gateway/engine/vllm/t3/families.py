"""Each family's T3 as the vLLM engine drives it: the rows a voice contributes (cached per
voice), what one text chunk sends to vLLM (prompt rows, placeholder ids, decoding controls),
how long a chunk's text may be, the vLLM model directory that serves it, its KV cache cost,
and the tokens that follow its speech into the vocoder.

* ``chatterbox`` and ``chatterbox-multilingual``: the Llama plugin (``model.py``) with CFG
  inside each sequence, prompts from :class:`~gateway.engine.vllm.t3.prompt.T3PromptBuilder`
  (Multilingual's 2454 text ids get the wide id layout, ``layout.IdLayout``); controls as
  upstream ``generate()``: temperature, top-p, min-p, repetition penalty, CFG weight,
  exaggeration.
* ``chatterbox-turbo``: the GPT-2 model (``turbo_model.py``) over
  :class:`~gateway.engine.vllm.t3.turbo.TurboPromptBuilder` rows, no CFG; controls as upstream
  ``inference_turbo``: temperature, top-k 1000, top-p, repetition penalty (no min-p); each
  chunk's speech ends with three S3Gen silence tokens, as upstream ``generate()`` appends.

Two differences from upstream Turbo's decoding, both vLLM's fixed order of operations: vLLM
applies the repetition penalty before top-k/top-p, upstream after them (penalty and
temperature commute, so only the kept set can differ, where a penalised token sits at the
top-p edge); and upstream never stops on its first token (it would drop a sampled stop id and
go on), which ``min_tokens=1`` gives here by excluding the stop id at that step.

Decoding controls are plain numbers (:class:`T3Sampling`), turned into vLLM's
``SamplingParams`` only on the GPU machine, so all of this is tested without vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from gateway.engine.base import GenerationParams
from gateway.engine.vllm.t3.fused_rows import FUSED_ARG, RowSampling, fusable
from gateway.engine.vllm.t3.layout import MAX_PROMPT, STOP_SPEECH, IdLayout, cfg_code
from gateway.engine.vllm.t3.penalty_rows import EXTRA_ARG
from gateway.errors import EngineError, InvalidRequestError
from gateway.models.families import TOP_K, Family

S3GEN_SILENCE = 4299
"""Upstream's ``S3GEN_SIL``: the speech token Turbo appends three times to every utterance."""
BF16_BYTES = 2


@dataclass(frozen=True, slots=True)
class T3Sampling:
    """One chunk's decoding controls (vLLM's ``SamplingParams`` fields, as plain numbers)."""

    max_tokens: int
    temperature: float
    top_p: float
    min_p: float
    repetition_penalty: float
    top_k: int = 0
    """0: off."""
    min_tokens: int = 0
    seed: int | None = None
    penalty_path: Literal["sampler", "resident", "fused"] = "sampler"
    """``vllm_penalty``: ``sampler``, vLLM samples; ``resident``, the repetition penalty
    through our device-resident processor (``penalty_rows.py``), the same arithmetic;
    ``fused``, the penalty, temperature, min-p, top-k, top-p and the draw in our processor
    (``fused_rows.py``) with vLLM left an argmax, for the requests it can draw
    (``fused_rows.fusable``: not greedy, not seeded), in upstream's order for the family
    (``penalty_after_filters``)."""
    penalty_after_filters: bool = False
    """Upstream applies the repetition penalty after top-k and top-p (Turbo's
    ``inference_turbo``), not first (``T3.inference``). vLLM's sampler always applies it
    first; the fused processor follows this."""

    def to_vllm(self) -> Any:
        """vLLM's ``SamplingParams`` (GPU machines only): speech token deltas, no text."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(**self.vllm_fields(), output_kind=RequestOutputKind.DELTA)

    def vllm_fields(self) -> dict[str, Any]:
        """``SamplingParams``' arguments but the output kind (plain values: tested without vLLM)."""
        temperature, min_p, penalty, extra = self.temperature, self.min_p, self.repetition_penalty, None
        top_p, top_k = self.top_p, self.top_k
        if self.penalty_path == "fused" and fusable(temperature=temperature, seed=self.seed):
            # greedy to vLLM: its argmax takes the token our processor drew
            extra = {FUSED_ARG: RowSampling(temperature, min_p, penalty, max(top_k, 0), top_p,
                                            self.penalty_after_filters).to_arg()}
            temperature, min_p, penalty, top_p, top_k = 0.0, 0.0, 1.0, 1.0, 0
        elif self.penalty_path == "resident" and penalty != 1.0:
            penalty, extra = 1.0, {EXTRA_ARG: self.repetition_penalty}  # vLLM's own penalty path stays off
        return {"max_tokens": self.max_tokens, "min_tokens": self.min_tokens, "temperature": temperature,
                "top_p": top_p, "top_k": top_k, "min_p": min_p, "repetition_penalty": penalty,
                "extra_args": extra, "seed": self.seed, "stop_token_ids": [STOP_SPEECH], "detokenize": False,
                "skip_special_tokens": False,
                # A seeded chunk computes its whole prompt: a prefix-cache hit prefills only the
                # prompt's tail, on other kernels and shapes than a full prefill, and those bf16
                # differences flip near-tied tokens (the H100 run of 2026-12-05 saw the same seed
                # part at the 8th-9th token on the CFG families). It still writes the cache for others.
                "skip_reading_prefix_cache": True if self.seed is not None else None}


class T3Prompt(Protocol):
    token_ids: list[int]

    def vllm_prompt(self) -> dict: ...


class FamilyT3(Protocol):
    """What the vLLM engine needs of one family's T3 (see the module docstring)."""

    family: Family
    tail_tokens: tuple[int, ...]
    """Speech tokens appended after the generated ones (the vocoder sees them, usage does not)."""

    def voice_rows(self, conditionals: Any) -> torch.Tensor:
        """The prompt rows that depend on the voice alone (cache them per voice). Blocking."""

    def request_rows(self, voice_rows: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        """The voice's rows with this request's share (the original's emotion row)."""

    def prompt(self, rows: torch.Tensor, text_ids: Sequence[int], params: GenerationParams) -> T3Prompt:
        """The chunk's vLLM prompt; InvalidRequestError for what the client can change."""

    def sampling(self, params: GenerationParams, *, max_tokens: int, seed: int | None,
                 fixed_length: bool) -> T3Sampling: ...

    def max_text_tokens(self, max_model_len: int) -> int: ...


class LlamaFamilyT3:
    """The original's and Multilingual's T3: Llama with CFG (``model.py``)."""

    tail_tokens: tuple[int, ...] = ()

    def __init__(self, family: Family, builder: Any) -> None:
        self.family = family
        self.builder = builder
        self.layout = IdLayout(builder.hp.text_tokens_dict_size)

    def voice_rows(self, conditionals: Any) -> torch.Tensor:
        from gateway.engine.checkpoint.components import request_t3_cond

        return self.builder.voice_rows(request_t3_cond(conditionals, 0.0))

    def request_rows(self, voice_rows: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        return self.builder.with_exaggeration(voice_rows, params.exaggeration)

    def prompt(self, rows: torch.Tensor, text_ids: Sequence[int], params: GenerationParams) -> T3Prompt:
        try:
            cfg_code(params.cfg_weight)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="cfg_weight") from None
        if rows.shape[0] + len(text_ids) + 2 >= MAX_PROMPT:
            raise InvalidRequestError(f"a text chunk is too long for the model's prompt ({MAX_PROMPT - 1} rows)",
                                      param="input")
        try:
            return self.builder.build(rows, text_ids, params.cfg_weight)
        except ValueError as exc:  # anything else is ours (ids, rows), not the client's
            raise EngineError(f"could not build the T3 prompt: {exc}") from exc

    def sampling(self, params: GenerationParams, *, max_tokens: int, seed: int | None,
                 fixed_length: bool) -> T3Sampling:
        return T3Sampling(max_tokens=max_tokens, min_tokens=max_tokens if fixed_length else 0,
                          temperature=params.temperature, top_p=params.top_p, min_p=params.min_p,
                          repetition_penalty=params.repetition_penalty, seed=seed)

    def max_text_tokens(self, max_model_len: int) -> int:
        """T3's learned text positions (minus start/stop), and the side channel's row budget
        (conditioning + start/stop text + two start-of-speech rows)."""
        return min(self.builder.hp.max_text_tokens, MAX_PROMPT - 1 - self.builder.cond_rows - 4)


class TurboFamilyT3:
    """Turbo's T3: GPT-2 medium without CFG (``turbo_model.py``)."""

    def __init__(self, family: Family, builder: Any) -> None:
        self.family = family
        self.builder = builder
        self.tail_tokens: tuple[int, ...] = (S3GEN_SILENCE,) * family.silence_tail_tokens

    def voice_rows(self, conditionals: Any) -> torch.Tensor:
        return self.builder.conditioning(conditionals.t3)

    def request_rows(self, voice_rows: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        return voice_rows  # no emotion row, no CFG: nothing of the request enters the rows

    def prompt(self, rows: torch.Tensor, text_ids: Sequence[int], params: GenerationParams) -> T3Prompt:
        return self.builder.build(rows, text_ids)

    def sampling(self, params: GenerationParams, *, max_tokens: int, seed: int | None,
                 fixed_length: bool) -> T3Sampling:
        return T3Sampling(max_tokens=max_tokens, min_tokens=max_tokens if fixed_length else 1,
                          temperature=params.temperature, top_p=params.top_p, min_p=0.0,
                          top_k=TOP_K.get(self.family.id, 0), repetition_penalty=params.repetition_penalty,
                          seed=seed, penalty_after_filters=True)

    def max_text_tokens(self, max_model_len: int) -> int:
        """Whatever leaves room in the context for the voice's rows, the start row and one
        speech token (GPT-2 has no text positions of its own to run out of)."""
        return min(self.builder.hp.max_text_tokens, max_model_len - self.cond_rows - 2)

    @property
    def cond_rows(self) -> int:
        return 1 + int(self.builder.hp.speech_cond_prompt_len)


def served_model_config(family: Family) -> dict[str, Any]:
    """The ``config.json`` vLLM reads for the family's T3 (its shape, from the family alone)."""
    if family.front_end == "gpt2":
        from gateway.engine.vllm.t3.turbo import turbo_model_config

        return turbo_model_config()
    from gateway.engine.checkpoint.modules import t3_config
    from gateway.engine.vllm.t3.config import t3_model_config

    hp = t3_config(family)
    return t3_model_config(text_vocab_size=hp.text_tokens_dict_size, max_speech_tokens=hp.max_speech_tokens,
                           max_text_tokens=hp.max_text_tokens)


def kv_bytes_per_token(family: Family, kv_cache_dtype: str = "auto") -> int:
    """KV cache bytes of one token of the family's served T3: keys and values of every layer,
    for the heads the kernels run (the Llama T3s: both CFG streams), in bf16 (``auto``) or
    one byte each (``fp8``, ``vllm_kv_cache_dtype``)."""
    config = served_model_config(family)
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    element = {"auto": BF16_BYTES, "fp8": 1}[kv_cache_dtype]
    return config["num_hidden_layers"] * 2 * heads * head_dim * element


def write_model_dir(directory: Path, family: Family, weights: Path) -> Path:
    """A directory vLLM can load for the family's T3: its ``config.json`` and a link to the
    checkpoint's T3 weights (a link: the checkpoint directory also holds S3Gen/VE files vLLM
    must not read). Idempotent."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(served_model_config(family), indent=2))
    link = directory / "model.safetensors"
    target = weights.resolve()
    if link.is_symlink() or link.exists():
        if link.resolve() == target:
            return directory
        link.unlink()
    link.symlink_to(target)
    return directory


def family_t3(family: Family, t3_state: Mapping[str, torch.Tensor]) -> FamilyT3:
    """The family's T3 front, its CPU modules loaded from the T3 checkpoint's tensors."""
    if family.front_end == "gpt2":
        from gateway.engine.vllm.t3.turbo import TurboPromptBuilder

        return TurboFamilyT3(family, TurboPromptBuilder.from_state_dict(t3_state))
    from gateway.engine.checkpoint.modules import t3_config
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder

    return LlamaFamilyT3(family, T3PromptBuilder.from_state_dict(t3_state, t3_config(family)))

