"""The t3step stage's setup, built without vLLM: each family's model directory, prompt and the
sampling the engine sends for the family's default controls (the timing itself needs a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gateway.engine.vllm.t3.penalty_rows import EXTRA_ARG
from gateway.engine.vllm.t3.turbo import TURBO_ARCHITECTURE
from gateway.tools.bench_t3 import t3step_setup


def test_turbo_setup_is_gpt2_with_its_served_sampling(tmp_path: Path) -> None:
    setup = t3step_setup("chatterbox-turbo", 40, tmp_path)
    config = json.loads((setup.model_dir / "config.json").read_text())
    assert config["architectures"] == [TURBO_ARCHITECTURE] and config["n_layer"] == 24
    embeds = setup.prompt["prompt_embeds"]
    # speaker row + 375 voice prompt rows + 40 text rows + the start-of-speech row, 1024 wide
    assert tuple(embeds.shape) == (1 + 375 + 40 + 1, 1024) and embeds.dtype == torch.bfloat16  # as served
    assert len(setup.prompt["prompt_token_ids"]) == embeds.shape[0]
    # upstream inference_turbo's controls: top-k 1000, top-p 0.95, no min-p, penalty 1.2
    assert setup.served == {"temperature": 0.8, "top_p": 0.95, "top_k": 1000, "min_p": 0.0,
                            "repetition_penalty": 1.2}
    assert setup.unpenalised == {"temperature": 0.8, "top_p": 0.95, "top_k": 1000, "min_p": 0.0}


def test_original_setup_keeps_cfg_and_min_p(tmp_path: Path) -> None:
    setup = t3step_setup("chatterbox", 20, tmp_path)
    config = json.loads((setup.model_dir / "config.json").read_text())
    assert config["architectures"] != [TURBO_ARCHITECTURE]
    assert setup.served == {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.2}
    assert "prompt_embeds" in setup.prompt


def test_resident_penalty_moves_to_the_processor(tmp_path: Path) -> None:
    setup = t3step_setup("chatterbox-turbo", 8, tmp_path, penalty="resident")
    assert setup.served["repetition_penalty"] == 1.0  # vLLM's own path stays off
    assert setup.served["extra_args"] == {EXTRA_ARG: 1.2}
    assert "extra_args" not in setup.unpenalised


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="t3step times"):
        t3step_setup("chatterbox-multilingual", 8, tmp_path)
