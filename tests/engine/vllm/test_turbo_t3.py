"""Turbo's T3 on vLLM, the CPU-testable parts: config, weight mapping, prompt rows equal to
upstream's ``prepare_input_embeds`` (the model itself runs on the GPU: tools/parity.py)."""

from __future__ import annotations

import pytest
import torch
from chatterbox.models.t3 import T3
from chatterbox.models.t3 import llama_configs
from chatterbox.models.t3.modules.cond_enc import T3Cond

from gateway.engine.checkpoint.modules import t3_config
from gateway.engine.vllm.t3.turbo import (
    SKIPPED_PREFIXES,
    TURBO_ARCHITECTURE,
    TurboPromptBuilder,
    expected_turbo_params,
    map_turbo_name,
    turbo_model_config,
)
from gateway.models.families import FAMILIES, TURBO

TINY_LAYERS = 2


@pytest.fixture(scope="module")
def turbo_t3() -> T3:
    tiny = {**llama_configs.GPT2_MEDIUM_CONFIG, "n_layer": TINY_LAYERS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(llama_configs.LLAMA_CONFIGS, "GPT2_tiny", tiny)
        hp = t3_config(FAMILIES[TURBO])
        hp.llama_config_name = "GPT2_tiny"
        torch.manual_seed(0)
        return T3(hp).eval()


def test_config_is_gpt2_medium_with_speech_logits() -> None:
    config = turbo_model_config()
    assert config["architectures"] == [TURBO_ARCHITECTURE] and config["model_type"] == "gpt2"
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (24, 1024, 16)
    assert config["vocab_size"] == 6563 and config["activation_function"] == "gelu_new"


def test_weight_mapping_covers_every_parameter(turbo_t3: T3) -> None:
    targets, skipped = set(), set()
    for name in turbo_t3.state_dict():
        target = map_turbo_name(name)
        if target is None:
            skipped.add(name)
        else:
            targets.add(target.param)
    assert targets == expected_turbo_params(TINY_LAYERS)
    assert all(any(name.startswith(p) for p in SKIPPED_PREFIXES) for name in skipped)
    assert map_turbo_name("tfmr.h.1.attn.c_attn.weight").transpose
    assert map_turbo_name("tfmr.h.1.mlp.c_fc.weight").param == "model.h.1.c_fc.weight"
    assert not map_turbo_name("tfmr.h.1.mlp.c_fc.bias").transpose
    with pytest.raises(KeyError):
        map_turbo_name("perceiver.weight")


def test_prompt_rows_are_upstreams_input_embeds(turbo_t3: T3) -> None:
    g = torch.Generator().manual_seed(3)
    cond = T3Cond(
        speaker_emb=torch.randn(1, 256, generator=g),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 375), generator=g),
        emotion_adv=0.5 * torch.ones(1, 1, 1),
    )
    text = [8969, 276, 50274, 13]
    builder = TurboPromptBuilder.from_state_dict(turbo_t3.state_dict())
    prompt = builder.build(builder.conditioning(cond), text)
    with torch.inference_mode():
        upstream, _ = turbo_t3.prepare_input_embeds(
            t3_cond=T3Cond(**{**cond.__dict__}),
            text_tokens=torch.tensor([text]),
            speech_tokens=torch.tensor([[6561]]),
            cfg_weight=0.0,
        )
    assert prompt.embeds.shape == (1 + 375 + len(text) + 1, 1024)
    assert torch.allclose(prompt.embeds, upstream[0].float(), atol=1e-6)
    assert set(prompt.token_ids) == {6561} and len(prompt.token_ids) == prompt.embeds.shape[0]
    assert cond.cond_prompt_speech_emb is None  # the voice's own object is never written to
