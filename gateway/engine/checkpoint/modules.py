"""A family's upstream modules (T3, S3Gen, voice encoder) built with upstream's configuration,
and its state files read and written in the format upstream loads them from.

One function builds the modules for both uses: random weights for a dummy checkpoint
(:mod:`~gateway.engine.checkpoint.dummy`) and empty shells that a checkpoint fills
(:mod:`~gateway.engine.checkpoint.components`), so a dummy checkpoint always has exactly the
parameters the loader expects. Configurations as upstream ``from_local`` sets them:

- original: ``T3()`` (English Llama T3), ``S3Gen()``;
- Turbo: ``T3Config(text_tokens_dict_size=50276)`` switched to ``GPT2_medium``, speech vocab
  6563, no learned positions (GPT-2 has its own), 375 prompt tokens, no Perceiver, no
  emotion row; ``S3Gen(meanflow=True)``;
- Multilingual: ``T3(T3Config.multilingual())``, ``S3Gen()``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.voice_encoder import VoiceEncoder
from safetensors.torch import load_file, save_file

from gateway.models.families import Family

TURBO_TEXT_VOCAB = 50276
TURBO_SPEECH_VOCAB = 6563


def t3_config(family: Family) -> T3Config:
    if family.front_end == "gpt2":
        hp = T3Config(text_tokens_dict_size=TURBO_TEXT_VOCAB)
        hp.llama_config_name = "GPT2_medium"
        hp.speech_tokens_dict_size = TURBO_SPEECH_VOCAB
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
        return hp
    if family.front_end == "multilingual":
        return T3Config.multilingual()
    return T3Config.english_only()


def build_t3(family: Family) -> T3:
    return T3(t3_config(family))


def build_s3gen(family: Family) -> S3Gen:
    return S3Gen(meanflow=family.meanflow)


def build_voice_encoder() -> VoiceEncoder:
    return VoiceEncoder()


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt`` file (tensors only, as upstream)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def save_state(module: torch.nn.Module, path: Path) -> None:
    state = {key: value.contiguous() for key, value in module.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
