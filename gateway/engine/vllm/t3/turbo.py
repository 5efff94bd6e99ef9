"""Turbo's T3 on vLLM, the CPU side: the model directory's config, where each checkpoint
tensor goes, and the prompt rows.

Turbo's T3 is GPT-2 medium (24 layers, width 1024, 16 heads, ``gelu_new``, absolute learned
positions ``wpe``) fed embeddings: no CFG, no learned text/speech positions of its own, no
Perceiver or emotion row. So unlike the original there is no side channel: a request is
``[speaker row][375 prompt speech rows][text rows][start-of-speech row]`` as prompt
embeddings (upstream ``prepare_input_embeds`` with ``cfg_weight=0``), the model adds
``wpe(position)`` to every row as GPT-2 does, and generated tokens enter through
``speech_emb``. Placeholder ids are all 6561 (the start of speech), an id the served model
masks, so vLLM's repetition penalty only ever touches a token that cannot be sampled.

The vLLM model itself is ``turbo_model.py`` (imported only by vLLM).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gateway.engine.vllm.t3.prompt import embeds_for_vllm

TURBO_ARCHITECTURE = "ChatterboxTurboT3ForCausalLM"
START_SPEECH = 6561
STOP_SPEECH = 6562
TURBO_SPEECH_VOCAB = 6563
MAX_POSITIONS = 8196

SKIPPED_PREFIXES: dict[str, str] = {
    "cond_enc.": "conditioning encoder runs on the CPU side (TurboPromptBuilder)",
    "text_emb.": "text rows are embedded on the CPU side (TurboPromptBuilder)",
    "text_head.": "text logits are a training-only output",
    "tfmr.wte.": "T3 feeds embeddings, never GPT-2 token ids (upstream deletes it too)",
}
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def turbo_model_config(*, dtype: str = "bfloat16") -> dict[str, Any]:
    """vLLM's view of Turbo's T3: GPT-2 medium whose logits are the 6563 speech ids."""
    return {
        "architectures": [TURBO_ARCHITECTURE],
        "model_type": "gpt2",
        "n_embd": 1024,
        "hidden_size": 1024,
        "n_layer": 24,
        "num_hidden_layers": 24,
        "n_head": 16,
        "num_attention_heads": 16,
        "n_inner": None,
        "n_positions": MAX_POSITIONS,
        "max_position_embeddings": MAX_POSITIONS,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "vocab_size": TURBO_SPEECH_VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": START_SPEECH,
        "eos_token_id": STOP_SPEECH,
    }


def write_turbo_model_dir(directory: Path, **kwargs: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(turbo_model_config(**kwargs), indent=2))
    return directory


@dataclass(frozen=True, slots=True)
class TurboTarget:
    param: str
    transpose: bool = False
    """HF GPT-2 stores these as Conv1D ``[in, out]``; vLLM's linear layers want ``[out, in]``."""


def map_turbo_name(name: str) -> TurboTarget | None:
    """Where tensor ``name`` of ``t3_turbo_v1.safetensors`` goes in the vLLM model; None when
    it stays on the CPU side or is unused. Unknown names raise."""
    for prefix in SKIPPED_PREFIXES:
        if name.startswith(prefix):
            return None
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # GPT-2's causal mask buffers (older checkpoints carry them)
    if name == "speech_emb.weight":
        return TurboTarget("model.speech_emb.weight")
    if name in ("speech_head.weight", "speech_head.bias"):
        return TurboTarget(name)
    if name.startswith("tfmr."):
        inner = "model." + name[len("tfmr."):]
        transpose = inner.endswith(_CONV1D)
        # the vLLM block holds the MLP's layers directly (model.h.i.c_fc)
        return TurboTarget(inner.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".c_proj."), transpose)
    raise KeyError(f"unexpected tensor in t3_turbo_v1.safetensors: {name}")


def expected_turbo_params(num_layers: int) -> set[str]:
    """The vLLM model's parameter names (checked against the real model on the GPU)."""
    names = {"model.wpe.weight", "model.ln_f.weight", "model.ln_f.bias", "model.speech_emb.weight",
             "speech_head.weight", "speech_head.bias"}
    for i in range(num_layers):
        base = f"model.h.{i}."
        for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "c_fc", "c_proj"):
            names |= {f"{base}{part}.weight", f"{base}{part}.bias"}
    return names


@dataclass(frozen=True, slots=True)
class TurboPrompt:
    embeds: torch.Tensor
    """[L, 1024] float32 CPU tensor."""
    token_ids: list[int]

    def vllm_prompt(self, dtype: torch.dtype | None = None) -> dict:
        return {"prompt_embeds": embeds_for_vllm(self.embeds, dtype), "prompt_token_ids": self.token_ids,
                "prompt_is_token_ids": [False] * len(self.token_ids)}


_NEEDED = ("cond_enc.", "speech_emb.", "text_emb.")


class TurboPromptBuilder(nn.Module):
    """The CPU half of Turbo's T3: voice and text -> prompt rows."""

    def __init__(self) -> None:
        super().__init__()
        from chatterbox.models.t3.modules.cond_enc import T3CondEnc

        from gateway.engine.checkpoint.modules import t3_config
        from gateway.models.families import FAMILIES, TURBO

        self.hp = t3_config(FAMILIES[TURBO])
        dim = self.hp.n_channels
        self.cond_enc = T3CondEnc(self.hp)
        self.text_emb = nn.Embedding(self.hp.text_tokens_dict_size, dim)
        self.speech_emb = nn.Embedding(self.hp.speech_tokens_dict_size, dim)
        self.eval()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> TurboPromptBuilder:
        builder = cls()
        builder.load_state_dict({k: v for k, v in state.items() if k.startswith(_NEEDED)}, strict=True)
        return builder

    @torch.inference_mode()
    def conditioning(self, t3_cond: Any) -> torch.Tensor:
        """``[1 + 375, dim]``: speaker row and prompt speech rows (GPT-2: no learned positions).
        Depends only on the voice: cache it per voice."""
        tokens = torch.atleast_2d(t3_cond.cond_prompt_speech_tokens).to("cpu")
        cond = type(t3_cond)(
            speaker_emb=t3_cond.speaker_emb.to("cpu", torch.float32),
            cond_prompt_speech_tokens=tokens,
            cond_prompt_speech_emb=self.speech_emb(tokens),
            emotion_adv=t3_cond.emotion_adv,
        )
        return self.cond_enc(cond)[0].float()

    @torch.inference_mode()
    def build(self, cond_rows: torch.Tensor, text_tokens: Sequence[int]) -> TurboPrompt:
        text = self.text_emb(torch.as_tensor(list(text_tokens), dtype=torch.long))
        start = self.speech_emb.weight[START_SPEECH][None]
        embeds = torch.cat((cond_rows, text, start)).float().contiguous()
        return TurboPrompt(embeds, [START_SPEECH] * embeds.shape[0])
