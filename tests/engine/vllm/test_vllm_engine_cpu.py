"""CPU tests of VllmEngine's own logic (no vLLM, no GPU): per-voice conditioning cache (off
the event loop, keyed by voice only), per-request CFG weight handling, the model directory
handed to vLLM, refusals and their ``param``, and the vocoder's part in health."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import pytest
import torch
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import Conditionals

from gateway.engine.base import GenerationParams, SynthesisJob, Voice
from gateway.engine.vllm.t3 import layout
from gateway.engine.vllm.t3.prompt import T3PromptBuilder
from gateway.engine.vllm.engine import VllmEngine
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


async def test_conditioning_is_cached_per_voice_whatever_the_exaggeration(engine, builder) -> None:
    a, b = _voice("a", 1), _voice("b", 2)
    rows = await engine._conditioning(_job(a, exaggeration=0.5))
    assert rows.shape == (builder.cond_rows, 1024) == (34, 1024)
    assert torch.equal(rows, builder.conditioning(a.conditionals.t3, 0.5))
    cached = engine._cond_cache["key-a"]
    # An attacker sweeping exaggeration (a free float) must not make the cache useless.
    for i in range(50):
        other = await engine._conditioning(_job(a, exaggeration=0.3 + i * 0.0137))
        assert engine._cond_cache["key-a"] is cached and len(engine._cond_cache) == 1
    torch.testing.assert_close(other[:-1], rows[:-1])  # the emotion row is the only one it changes
    assert torch.equal(other, builder.conditioning(a.conditionals.t3, 0.3 + 49 * 0.0137))
    await engine._conditioning(_job(b, exaggeration=0.5))
    assert list(engine._cond_cache) == ["key-b"]  # bounded by voice_cache_size, LRU


async def test_conditioning_runs_off_the_event_loop_once_per_voice(engine, builder, monkeypatch) -> None:
    """A cache miss runs the Perceiver on a worker thread (the loop keeps serving), and
    concurrent requests for one voice share that one computation."""
    loop_thread = threading.get_ident()
    calls = []
    gate = threading.Event()
    real = builder.voice_rows

    def slow(cond):
        calls.append(threading.get_ident())
        gate.wait(5)
        return real(cond)

    monkeypatch.setattr(builder, "voice_rows", slow)
    voice = _voice("c", 3)
    waiters = [asyncio.create_task(engine._conditioning(_job(voice, exaggeration=e))) for e in (0.4, 0.6, 0.8)]
    ticks = 0
    while ticks < 5:  # the event loop still runs while the Perceiver works
        await asyncio.sleep(0.01)
        ticks += 1
    assert not any(w.done() for w in waiters)
    gate.set()
    results = await asyncio.gather(*waiters)
    assert len(calls) == 1 and calls[0] != loop_thread
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("cfg_weight", [0.0, 0.3, 0.5, 1.0, 2.5])
async def test_each_request_carries_its_own_cfg_weight(engine, cfg_weight: float) -> None:
    text = [255, 10, 20, 30, 0]
    prompt = await engine._prompt(_job(_voice("a", 1), cfg_weight=cfg_weight), text)
    positions, delta = layout.mrope_positions(prompt.token_ids)
    rows = layout.decode_positions(positions + 0, max_position=2048, speech_positions=4100, text_vocab=704)
    assert torch.equal(rows.cfg_weight, torch.full_like(rows.cfg_weight, cfg_weight))
    # a decode step of this request (vLLM: context length + delta) sees the same weight
    step = torch.full((3, 1), len(prompt.token_ids) + 5 + delta)
    decoded = layout.decode_positions(step, max_position=2048, speech_positions=4100, text_vocab=704)
    assert float(decoded.cfg_weight[0]) == pytest.approx(cfg_weight)
    assert int(decoded.speech_index[0]) == 6
    # the weight changes only the two side-channel ids, never the rows
    base = await engine._prompt(_job(_voice("a", 1), cfg_weight=0.0), text)
    assert torch.equal(prompt.embeds, base.embeds)
    assert prompt.token_ids[2:] == base.token_ids[2:]


async def test_unrepresentable_cfg_weight_is_a_client_error(engine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await engine._prompt(_job(_voice("a", 1), cfg_weight=6.0), [255, 1, 0])
    assert err.value.status_code == 400 and err.value.param == "cfg_weight"


async def test_a_too_long_prompt_names_the_input_not_cfg_weight(engine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await engine._prompt(_job(_voice("a", 1), cfg_weight=0.5), [255] + [7] * layout.MAX_PROMPT + [0])
    assert err.value.status_code == 400 and err.value.param == "input"


async def test_health_includes_the_vocoder(engine) -> None:
    class DeadVocoder:
        def check_health(self):
            raise EngineUnavailableError("the vocoder loop died: boom")

    engine._components = object()  # loaded
    engine.vocoder = DeadVocoder()
    with pytest.raises(EngineUnavailableError, match="vocoder"):
        await engine.check_health()


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
