"""T3 prompt embeddings, built on the CPU from upstream T3 modules.

vLLM receives each request as ``[L, 1024]`` fp32 prompt embeddings (fp32 measured faster
than bf16 through vLLM's transport) plus placeholder ids (``layout``). The rows are the
*unconditional* stream: conditioning rows (speaker, Perceiver over the prompt speech
tokens, emotion), text rows holding only the learned text positions (upstream's uncond
stream zeroes the text embeddings and keeps their positions), and two start-of-speech rows
(speech embedding + speech position 0). The model adds the text embeddings for the
conditional stream itself, so the prompt crosses the process boundary once, not twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from gateway.engine.vllm.t3.layout import START_SPEECH, IdLayout, placeholder_ids

_NEEDED_PREFIXES = ("cond_enc.", "speech_emb.", "speech_pos_emb.", "text_pos_emb.", "text_emb.")


@dataclass(frozen=True, slots=True)
class T3Prompt:
    embeds: torch.Tensor
    """[L, 1024] float32 CPU tensor: the unconditional stream's input rows."""
    token_ids: list[int]
    """Placeholder ids carrying the side channel (see ``layout``)."""
    n_cond: int
    n_text: int

    def vllm_prompt(self, dtype: torch.dtype | None = None) -> dict:
        """The EmbedsPrompt dict for ``AsyncLLM.generate``: every row comes from the embeds
        (in ``dtype``: :func:`embeds_for_vllm`)."""
        return {"prompt_embeds": embeds_for_vllm(self.embeds, dtype), "prompt_token_ids": self.token_ids,
                "prompt_is_token_ids": [False] * len(self.token_ids)}


def embeds_for_vllm(embeds: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Prompt rows as vLLM should receive them: in the served model's ``dtype`` (None: as
    they are). vLLM casts them to it in the worker anyway (the same rounding), but before
    that it ships them to its engine core and hashes them there for the prefix cache
    (sha256 of every block's rows), at twice the bytes in float32."""
    return embeds if dtype is None or embeds.dtype == dtype else embeds.to(dtype)


class T3PromptBuilder(nn.Module):
    """The CPU half of T3: what turns a voice and a text into prompt rows."""

    def __init__(self, hp=None) -> None:
        super().__init__()
        from chatterbox.models.t3.modules.cond_enc import T3CondEnc
        from chatterbox.models.t3.modules.learned_pos_emb import LearnedPositionEmbeddings
        from chatterbox.models.t3.modules.t3_config import T3Config

        self.hp = hp or T3Config.english_only()
        dim = self.hp.n_channels
        self.cond_enc = T3CondEnc(self.hp)
        self.text_emb = nn.Embedding(self.hp.text_tokens_dict_size, dim)
        self.speech_emb = nn.Embedding(self.hp.speech_tokens_dict_size, dim)
        self.text_pos_emb = LearnedPositionEmbeddings(self.hp.max_text_tokens + 2, dim)
        self.speech_pos_emb = LearnedPositionEmbeddings(self.hp.max_speech_tokens + 2 + 2, dim)
        self.eval()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], hp=None) -> "T3PromptBuilder":
        builder = cls(hp)
        wanted = {k: v for k, v in state.items() if k.startswith(_NEEDED_PREFIXES)}
        builder.load_state_dict(wanted, strict=True)
        return builder

    @classmethod
    def from_checkpoint(cls, t3_safetensors: Path, hp=None) -> "T3PromptBuilder":
        from safetensors import safe_open

        with safe_open(str(t3_safetensors), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(_NEEDED_PREFIXES)}
        return cls.from_state_dict(state, hp)

    @torch.inference_mode()
    def conditioning(self, t3_cond, exaggeration: float | None = None) -> torch.Tensor:
        """Conditioning rows ``[n_cond, dim]`` for a voice (upstream ``T3.prepare_conditioning``,
        without its caching side effect on ``t3_cond``). Cache the result per voice and
        exaggeration: it does not depend on the text."""
        cond = replace(t3_cond)
        if exaggeration is not None:
            cond.emotion_adv = exaggeration * torch.ones(1, 1, 1)
        cond = cond.to(device=torch.device("cpu"), dtype=torch.float32)
        if cond.cond_prompt_speech_tokens is not None and cond.cond_prompt_speech_emb is None:
            tokens = torch.atleast_2d(cond.cond_prompt_speech_tokens)
            cond.cond_prompt_speech_tokens = tokens
            cond.cond_prompt_speech_emb = self.speech_emb(tokens) + self.speech_pos_emb(tokens)
        return self.cond_enc(cond)[0].float()

    @property
    def cond_rows(self) -> int:
        """Conditioning rows of every prompt: speaker, the Perceiver's queries (or the prompt
        speech tokens without one), emotion."""
        perceiver = self.cond_enc.perceiver
        prompt = perceiver.pre_attention_query.shape[1] if perceiver is not None else self.hp.speech_cond_prompt_len
        return 1 + int(prompt) + int(bool(self.hp.emotion_adv))

    def voice_rows(self, t3_cond) -> torch.Tensor:
        """The conditioning rows that depend on the voice alone (the Perceiver's work): cache
        these per voice; :meth:`with_exaggeration` adds a request's emotion row."""
        return self.conditioning(t3_cond, 0.0)

    @torch.inference_mode()
    def with_exaggeration(self, voice_rows: torch.Tensor, exaggeration: float) -> torch.Tensor:
        """``conditioning(t3_cond, exaggeration)`` from :meth:`voice_rows`: the emotion row is
        ``emotion_adv_fc`` (bias-free, one input) of the exaggeration, i.e. a scaled column."""
        fc = self.cond_enc.emotion_adv_fc
        if fc is None:
            return voice_rows
        rows = voice_rows.clone()
        rows[-1] = torch.tensor(float(exaggeration), dtype=torch.float32) * fc.weight[:, 0].float()
        return rows

    @torch.inference_mode()
    def build(self, cond_rows: torch.Tensor, text_tokens: Sequence[int], cfg_weight: float) -> T3Prompt:
        """The prompt for ``text_tokens`` (already wrapped in start/stop text tokens)."""
        tokens = torch.as_tensor(list(text_tokens), dtype=torch.long)[None]
        text_rows = self.text_pos_emb(tokens)
        bos = self.speech_emb.weight[START_SPEECH] + self.speech_pos_emb.get_fixed_embedding(0)[0, 0]
        embeds = torch.cat((cond_rows, text_rows, bos[None], bos[None])).float().contiguous()
        ids = placeholder_ids(
            cond_rows.shape[0], [int(t) for t in text_tokens], cfg_weight, IdLayout(self.hp.text_tokens_dict_size)
        )
        return T3Prompt(embeds, ids, cond_rows.shape[0], tokens.shape[1])

    @torch.inference_mode()
    def streams(self, prompt: T3Prompt, text_tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) input rows as the model forms them (for tests)."""
        cond = prompt.embeds.clone()
        lo = prompt.n_cond
        cond[lo:lo + prompt.n_text] += self.text_emb(torch.as_tensor(list(text_tokens), dtype=torch.long))
        return cond, prompt.embeds
