"""CPU tests of the T3-on-vLLM pieces that need no vLLM: prompt embeddings equal upstream's,
the position side channel round-trips, the weight mapping covers every parameter and the
model config is what vLLM needs."""

from __future__ import annotations

import json

import pytest
import torch
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.models.t3.modules.t3_config import T3Config

from gateway.engine.vllm.t3 import layout
from gateway.engine.vllm.t3.config import ARCHITECTURE, t3_model_config, write_model_dir
from gateway.engine.vllm.t3.prompt import T3PromptBuilder
from gateway.engine.vllm.t3.weights import SKIPPED_PREFIXES, expected_params, map_name

TINY_LAYERS = 2


@pytest.fixture(scope="module")
def t3() -> T3:
    """Upstream T3 with its real embedding/conditioning shapes and a 2-layer backbone."""
    torch.manual_seed(0)
    tiny = dict(LLAMA_CONFIGS["Llama_520M"], num_hidden_layers=TINY_LAYERS, intermediate_size=256)
    LLAMA_CONFIGS["test_tiny"] = tiny
    try:
        hp = T3Config.english_only()
        hp.llama_config_name = "test_tiny"
        model = T3(hp).eval()
        for p in model.parameters():  # upstream leaves some rows at init scale; randomise all
            torch.nn.init.normal_(p, std=0.5)
        yield model
    finally:
        del LLAMA_CONFIGS["test_tiny"]


def _cond(seed: int, exaggeration: float = 0.5) -> T3Cond:
    g = torch.Generator().manual_seed(seed)
    return T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
                  emotion_adv=exaggeration * torch.ones(1, 1, 1))


def _text(seed: int, n: int = 17) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [255] + torch.randint(1, 704, (n,), generator=g).tolist() + [0]


@pytest.mark.parametrize("cfg_weight,exaggeration", [(0.5, 0.5), (0.0, 0.7), (1.3, 0.25)])
def test_prompt_rows_equal_upstream_input_embeds(t3: T3, cfg_weight: float, exaggeration: float) -> None:
    builder = T3PromptBuilder.from_state_dict(t3.state_dict(), t3.hp)
    text = _text(1)
    cond_rows = builder.conditioning(_cond(2), exaggeration)
    prompt = builder.build(cond_rows, text, cfg_weight)

    # Upstream: batch of two (cond, uncond) with zeroed uncond text when cfg > 0, then the
    # decode loop appends a second start-of-speech row (speech_emb + position 0).
    tokens = torch.tensor([text, text])
    with torch.inference_mode():
        ref, len_cond = t3.prepare_input_embeds(t3_cond=_cond(2, exaggeration), text_tokens=tokens,
                                                speech_tokens=torch.full((2, 1), 6561),
                                                cfg_weight=max(cfg_weight, 1e-3))
        bos = t3.speech_emb(torch.tensor([[6561]])) + t3.speech_pos_emb.get_fixed_embedding(0)
        ref = torch.cat([ref, torch.cat([bos, bos])], dim=1)

    cond, uncond = builder.streams(prompt, text)
    assert prompt.n_cond == len_cond == 34
    assert prompt.embeds.dtype == torch.float32 and prompt.embeds.shape == ref.shape[1:]
    torch.testing.assert_close(cond, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond, ref[1], rtol=1e-5, atol=1e-5)
    assert len(prompt.token_ids) == prompt.embeds.shape[0]


@pytest.mark.parametrize("exaggeration", [0.0, 0.25, 0.7, 1.9999])
def test_voice_rows_plus_exaggeration_equal_full_conditioning(t3: T3, exaggeration: float) -> None:
    """The Perceiver runs once per voice (cached, off the event loop); a request's
    exaggeration only sets the emotion row, so it is no part of the cache key."""
    builder = T3PromptBuilder.from_state_dict(t3.state_dict(), t3.hp)
    voice = builder.voice_rows(_cond(5))
    assert voice.shape[0] == builder.cond_rows == 34
    full = builder.conditioning(_cond(5), exaggeration)
    assert torch.equal(builder.with_exaggeration(voice, exaggeration), full)
    assert not torch.equal(builder.with_exaggeration(voice, exaggeration + 0.5), full)


def test_conditioning_does_not_mutate_the_voice(t3: T3) -> None:
    builder = T3PromptBuilder.from_state_dict(t3.state_dict(), t3.hp)
    voice = _cond(3)
    builder.conditioning(voice, 0.9)
    assert voice.cond_prompt_speech_emb is None
    assert float(voice.emotion_adv.flatten()[0]) == 0.5


def test_vllm_prompt_marks_every_row_as_embedding(t3: T3) -> None:
    builder = T3PromptBuilder.from_state_dict(t3.state_dict(), t3.hp)
    prompt = builder.build(builder.conditioning(_cond(4)), _text(5), 0.5)
    p = prompt.vllm_prompt()
    assert p["prompt_is_token_ids"] == [False] * len(prompt.token_ids)
    assert p["prompt_embeds"] is prompt.embeds
    # served: in the model's dtype (vLLM ships and hashes them before its own cast, the same rounding)
    served = prompt.vllm_prompt(torch.bfloat16)["prompt_embeds"]
    assert served.dtype == torch.bfloat16 and torch.equal(served, prompt.embeds.to(torch.bfloat16))
    assert served.untyped_storage().nbytes() == prompt.embeds.untyped_storage().nbytes() // 2


@pytest.mark.parametrize("cfg_weight", [0.0, 0.5, 0.3, 1.0, 3.75, 5.115])
def test_side_channel_round_trips(cfg_weight: float) -> None:
    text = _text(6, 40)
    ids = layout.placeholder_ids(34, text, cfg_weight)
    length = len(ids)
    generated = [17, 6560, 3]
    # After a preemption vLLM hands the model prompt + generated tokens as one list.
    positions, delta = layout.mrope_positions(ids + generated)
    assert positions.shape == (3, length + 3)
    # vLLM computes decode positions as context_len + delta on all three rows.
    decode = torch.full((3, 4), 0, dtype=torch.int64)
    decode[:] = torch.arange(length + 3, length + 7) + delta
    rows = layout.decode_positions(torch.cat([positions, decode], dim=1), max_position=2048,
                                   speech_positions=4100, text_vocab=704)
    n = length + 7
    assert rows.position.tolist() == list(range(n))
    assert rows.is_generated.tolist() == [False] * length + [True] * 7
    assert rows.speech_index[length:].tolist() == list(range(1, 8))  # token k sees position k+1
    assert rows.is_text.tolist() == [False] * 34 + [True] * len(text) + [False] * 9
    assert rows.text_token[34:34 + len(text)].tolist() == text
    expected_w = torch.tensor(round(cfg_weight * 200), dtype=torch.float32) / 200
    assert torch.equal(rows.cfg_weight, expected_w.expand(n))
    assert torch.equal(rows.cfg_weight[0], torch.tensor(cfg_weight, dtype=torch.float32))


def test_side_channel_ids_are_never_sampled_tokens() -> None:
    ids = layout.placeholder_ids(34, _text(7), 0.5)
    # Only the start-of-speech rows use a real speech id (as upstream penalises it); every
    # other placeholder lies in the masked range so the repetition penalty cannot see it.
    assert ids[-2:] == [6561, 6561]
    assert all(i >= 6563 and i < 8194 for i in ids[:-2])


def test_stale_rows_decode_in_range() -> None:
    junk = torch.tensor([[0, 123456789012, 2**58 + 5], [-999999, 5, -3], [0, 0, 0]], dtype=torch.int64)
    rows = layout.decode_positions(junk, max_position=2048, speech_positions=4100, text_vocab=704)
    assert int(rows.position.max()) < 2048 and int(rows.speech_index.max()) < 4100
    assert int(rows.text_token.max()) < 704 and int(rows.text_token.min()) >= 0
    assert torch.isfinite(rows.cfg_weight).all()


def test_bad_side_channel_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        layout.placeholder_ids(34, [255, 800, 0], 0.5)
    with pytest.raises(ValueError):
        layout.placeholder_ids(34, [255, 0], -0.1)
    with pytest.raises(ValueError):
        layout.placeholder_ids(34, [255, 0], 5.2)
    with pytest.raises(ValueError):
        layout.placeholder_ids(34, [255] + [1] * 1000 + [0], 0.5)
    with pytest.raises(ValueError):
        layout.mrope_positions([8100, 8100, 6563, 6561])


def test_weight_mapping_covers_every_parameter(t3: T3) -> None:
    targets = set()
    skipped = set()
    for name in t3.state_dict():
        target = map_name(name)
        if target is None:
            skipped.add(name.split(".")[0] + "." + (name.split(".")[1] + "." if name.startswith("tfmr.") else ""))
        else:
            targets.add(target.param)
    assert targets == expected_params(TINY_LAYERS)
    assert skipped <= set(SKIPPED_PREFIXES)
    assert map_name("tfmr.layers.3.self_attn.k_proj.weight").shard == "k"
    assert map_name("tfmr.layers.3.mlp.up_proj.weight").shard == 1
    with pytest.raises(KeyError):
        map_name("something.else")


def test_model_config_is_what_vllm_needs(tmp_path) -> None:
    cfg = json.loads((write_model_dir(tmp_path / "m") / "config.json").read_text())
    assert cfg == t3_model_config()
    assert cfg["architectures"] == [ARCHITECTURE]
    assert cfg["vocab_size"] == 8194  # must equal the logits width
    assert cfg["hidden_size"] == 1024 and cfg["num_hidden_layers"] == 30
    assert "mrope_section" in cfg["rope_scaling"]  # switches vLLM's position side channel on
    assert cfg["max_position_embeddings"] == layout.MAX_POSITIONS
    assert cfg["eos_token_id"] == 6562
    from transformers import AutoConfig

    parsed = AutoConfig.from_pretrained(tmp_path / "m")
    assert parsed.rope_parameters["rope_type"] == "llama3"
    assert parsed.rope_parameters["mrope_section"] == [32]
    assert parsed.t3_text_vocab_size == 704
    # What the attention kernels run (two CFG streams of T3's 16 heads): vLLM's backends
    # plan from these; T3's own count has a field of its own.
    assert (parsed.num_attention_heads, parsed.num_key_value_heads, parsed.head_dim) == (32, 32, 64)
    assert parsed.t3_num_heads == 16


def test_multilingual_text_ids_ride_a_wider_id_layout() -> None:
    wide = layout.IdLayout(2454)
    text = [255, 708, *range(700, 760), 2453, 0]  # [START], [en], ids past the English 737, [STOP]
    ids = layout.placeholder_ids(34, text, 0.5, wide)
    assert all(6563 <= i < wide.logits_width for i in ids[:-2]) and ids[-2:] == [6561, 6561]
    positions, delta = layout.mrope_positions(ids + [5, 6], wide)
    rows = layout.decode_positions(positions, max_position=2048, speech_positions=4100, text_vocab=2454)
    assert rows.text_token[34:34 + len(text)].tolist() == text
    assert rows.is_generated.tolist()[-2:] == [True, True]
    assert torch.equal(rows.cfg_weight[0], torch.tensor(0.5))
    with pytest.raises(ValueError):
        layout.placeholder_ids(34, [255, 2454, 0], 0.5, wide)
    # the English layout cannot carry them, and keeps its 8194-wide logits
    with pytest.raises(ValueError):
        layout.placeholder_ids(34, [255, 708, 0], 0.5)
    assert layout.ENGLISH.logits_width == 8194 and layout.ENGLISH.cond_digit_base == 7300


def test_multilingual_config_widens_logits_but_not_the_speech_vocabulary() -> None:
    config = t3_model_config(text_vocab_size=2454)
    assert config["vocab_size"] == layout.IdLayout(2454).logits_width > 8194
    assert config["t3_speech_vocab_size"] == 8194 and config["t3_text_vocab_size"] == 2454
    assert "t3_speech_vocab_size" not in t3_model_config()


def test_multilingual_prompt_builder_uses_the_wide_layout() -> None:
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config.multilingual()
    hp.llama_config_name = "Llama_520M"
    builder = T3PromptBuilder(hp)
    text = [255, 708, 2000, 0]
    prompt = builder.build(builder.conditioning(_cond(2)), text, 0.5)
    assert prompt.token_ids[34:38] == [6563 + t for t in text]
    assert prompt.token_ids[0] >= layout.IdLayout(2454).cond_digit_base
