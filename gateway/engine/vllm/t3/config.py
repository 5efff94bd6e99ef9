"""The HF-style ``config.json`` that vLLM reads for the T3 model directory.

vLLM only needs a config it can parse (``model_type: llama``) naming our architecture; our
model reads its own shape from the ``t3_*`` fields. ``hidden_size`` is T3's width (1024): it
is the width of the prompt embeddings vLLM carries. ``vocab_size`` is the speech vocabulary
(8194) because it must equal the width of the logits; a text vocabulary too large for the
English id layout (Multilingual) widens both (``layout.IdLayout``), and ``t3_speech_vocab_size``
keeps the speech embedding and head at 8194. The head counts are what the
attention kernels run: 32 heads and 32 KV heads of 64 (T3's 16 heads for each of the two
CFG streams side by side, see ``model``): vLLM's attention backends plan their schedules
(FlashAttention-3's split heuristic, buffer sizes) from these fields, and a plan made for 16
heads does not fit a kernel run with 32. T3's own head count is ``t3_num_heads``. ``mrope_section`` in the rope
parameters switches vLLM's M-RoPE position path on: our side channel (see ``layout``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.engine.vllm.t3.layout import MAX_POSITIONS, SPEECH_VOCAB, START_SPEECH, STOP_SPEECH, IdLayout

ARCHITECTURE = "ChatterboxT3ForCausalLM"
T3_HEADS = 16
"""Attention heads of T3 itself (Llama 520M); the served model runs twice as many."""


def t3_model_config(*, text_vocab_size: int = 704, max_speech_tokens: int = 4096,
                    max_text_tokens: int = 2048, dtype: str = "bfloat16") -> dict[str, Any]:
    """The config dict for upstream T3 (``Llama_520M`` with ``T3Config.english_only()``, or
    ``multilingual()`` with ``text_vocab_size=2454``)."""
    if text_vocab_size <= 0:
        raise ValueError(f"text vocabulary {text_vocab_size} must be positive")
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 30,
        "num_attention_heads": 2 * T3_HEADS,
        "num_key_value_heads": 2 * T3_HEADS,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "vocab_size": IdLayout(text_vocab_size).logits_width,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "mrope_section": [32],
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": START_SPEECH,
        "eos_token_id": STOP_SPEECH,
        "t3_num_heads": T3_HEADS,
        "t3_text_vocab_size": text_vocab_size,
        "t3_speech_positions": max_speech_tokens + 4,
        "t3_text_positions": max_text_tokens + 2,
    }
    if config["vocab_size"] != SPEECH_VOCAB:
        config["t3_speech_vocab_size"] = SPEECH_VOCAB  # only then: the English config is unchanged
    return config


def write_model_dir(directory: Path, **kwargs: Any) -> Path:
    """Write ``config.json`` into ``directory`` (created) and return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(t3_model_config(**kwargs), indent=2))
    return directory
