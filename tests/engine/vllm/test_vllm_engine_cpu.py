"""CPU tests of VllmEngine's own logic (no vLLM, no GPU): per-voice conditioning cache,
per-request CFG weight handling, the model directory handed to vLLM, and refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import Conditionals

from gateway.engine.base import GenerationParams, SynthesisJob, Voice
from gateway.engine.vllm.t3 import layout
from gateway.engine.vllm.t3.prompt import T3PromptBuilder
from gateway.engine.vllm.engine import COND_ROWS, VllmEngine
from gateway.errors import EngineUnavailableError, InvalidRequestError
from gateway.settings import load_settings


@pytest.fixture(scope="module")
def builder() -> T3PromptBuilder:
    torch.manual_seed(0)
    return T3PromptBuilder()


@pytest.fixture
def engine(tmp_path, builder) -> VllmEngine:
    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "voice_cache_size": 1})
    eng = VllmEngine(settings)
    eng._builder = builder  # what start() builds from the checkpoint
    return eng


def _voice(name: str, seed: int) -> Voice:
    g = torch.Generator().manual_seed(seed)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    return Voice(name, f"key-{name}", Conditionals(cond, {}))


def _job(voice: Voice, **params) -> SynthesisJob:
    return SynthesisJob("r1", ("hello",), voice, GenerationParams(**params))


def test_constructing_needs_no_vllm(engine) -> None:
    assert "vllm" not in sys.modules
    assert engine.name == "vllm" and engine.batch_stats() is None
    with pytest.raises(EngineUnavailableError):  # not loaded until start()
        engine.components


def test_context_beyond_the_side_channel_is_refused(tmp_path) -> None:
    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "vllm_max_model_len": 4096})
    with pytest.raises(ValueError, match="2048"):
        VllmEngine(settings)


def test_not_started_engine_is_unavailable(engine) -> None:
    with pytest.raises(EngineUnavailableError):
        engine.builtin_conditionals()
    with pytest.raises(EngineUnavailableError):
        engine.count_text_tokens("hi")


def test_conditioning_is_cached_per_voice_and_exaggeration(engine, builder) -> None:
    a, b = _voice("a", 1), _voice("b", 2)
    rows = engine._conditioning(_job(a, exaggeration=0.5))
    assert rows.shape == (COND_ROWS, 1024)
    assert engine._conditioning(_job(a, exaggeration=0.5)) is rows
    other = engine._conditioning(_job(a, exaggeration=0.9))
    assert other is not rows and not torch.equal(other, rows)
    # the emotion row is the only one exaggeration changes
    torch.testing.assert_close(other[:-1], rows[:-1])
    expected = builder.conditioning(a.conditionals.t3, 0.9)
    torch.testing.assert_close(other, expected)
    engine._conditioning(_job(b, exaggeration=0.5))
    assert len(engine._cond_cache) == 2  # bounded: 2 x voice_cache_size
    assert ("key-a", 0.5) not in engine._cond_cache  # least recently used went first


@pytest.mark.parametrize("cfg_weight", [0.0, 0.3, 0.5, 1.0, 2.5])
def test_each_request_carries_its_own_cfg_weight(engine, cfg_weight: float) -> None:
    text = [255, 10, 20, 30, 0]
    prompt = engine._prompt(_job(_voice("a", 1), cfg_weight=cfg_weight), text)
    positions, delta = layout.mrope_positions(prompt.token_ids)
    rows = layout.decode_positions(positions + 0, max_position=2048, speech_positions=4100, text_vocab=704)
    assert torch.equal(rows.cfg_weight, torch.full_like(rows.cfg_weight, cfg_weight))
    # a decode step of this request (vLLM: context length + delta) sees the same weight
    step = torch.full((3, 1), len(prompt.token_ids) + 5 + delta)
    decoded = layout.decode_positions(step, max_position=2048, speech_positions=4100, text_vocab=704)
    assert float(decoded.cfg_weight[0]) == pytest.approx(cfg_weight)
    assert int(decoded.speech_index[0]) == 6
    # the weight changes only the two side-channel ids, never the rows
    base = engine._prompt(_job(_voice("a", 1), cfg_weight=0.0), text)
    assert torch.equal(prompt.embeds, base.embeds)
    assert prompt.token_ids[2:] == base.token_ids[2:]


def test_unrepresentable_cfg_weight_is_a_client_error(engine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        engine._prompt(_job(_voice("a", 1), cfg_weight=6.0), [255, 1, 0])
    assert err.value.status_code == 400 and err.value.param == "cfg_weight"


def test_model_dir_links_only_the_t3_weights(engine, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors"):
        (ckpt / name).write_bytes(b"x")
    model_dir = engine._model_dir(ckpt)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert (model_dir / "model.safetensors").resolve() == (ckpt / "t3_cfg.safetensors").resolve()
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 8194
    assert engine._model_dir(ckpt) == model_dir  # idempotent
    other = tmp_path / "ckpt2"
    other.mkdir()
    (other / "t3_cfg.safetensors").write_bytes(b"y")
    assert (engine._model_dir(other) / "model.safetensors").resolve() == (other / "t3_cfg.safetensors").resolve()
