"""CPU tests of VllmEngine's own logic (no vLLM, no GPU): a runtime per loaded family, the
per-voice rows cache (off the event loop, keyed by voice only), per-request CFG weight
handling, the model directory handed to vLLM per family, the KV cache plan, refusals and
their ``param``, and every family's vocoder and engine in health. Whole jobs per family
through a stand-in AsyncLLM and the real vocoder: test_vllm_families_cpu.py."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import Conditionals

from gateway.engine.base import GenerationParams, SynthesisJob, Voice
from gateway.engine.vllm.engine import VllmEngine
from gateway.engine.vllm.gpu_memory import ENGINE_OVERHEAD_BYTES, EXACT_KV_UTILIZATION, GIB, kv_cache_plan
from gateway.engine.vllm.t3 import layout
from gateway.engine.vllm.t3.families import LlamaFamilyT3, kv_bytes_per_token, write_model_dir
from gateway.engine.vllm.t3.prompt import T3PromptBuilder
from gateway.engine.vllm.voice_rows import VoiceRowsCache
from gateway.errors import EngineError, EngineUnavailableError, InvalidRequestError
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO
from gateway.settings import SettingsError, load_settings

ALL = (ORIGINAL, TURBO, MULTILINGUAL)


@pytest.fixture(scope="module")
def builder() -> T3PromptBuilder:
    torch.manual_seed(0)
    return T3PromptBuilder()


@pytest.fixture
def engine(tmp_path, builder) -> VllmEngine:
    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "voice_cache_size": 1})
    eng = VllmEngine(settings)
    runtime = eng.runtimes[ORIGINAL]  # what start() builds from the checkpoint
    runtime.t3 = LlamaFamilyT3(FAMILIES[ORIGINAL], builder)
    runtime.rows = VoiceRowsCache(runtime.t3.voice_rows, settings.voice_cache_size)
    return eng


def _voice(name: str, seed: int) -> Voice:
    g = torch.Generator().manual_seed(seed)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    return Voice(name, f"key-{name}", Conditionals(cond, {}))


def _job(voice: Voice, **params) -> SynthesisJob:
    return SynthesisJob("r1", ("hello",), voice, GenerationParams(**params))


async def _rows(engine: VllmEngine, job: SynthesisJob) -> torch.Tensor:
    runtime = engine.runtimes[job.model]
    return runtime.t3.request_rows(await runtime.rows.get(job.voice.key, job.voice.conditionals), job.params)


def test_constructing_needs_no_vllm(engine) -> None:
    assert "vllm" not in sys.modules
    assert engine.name == "vllm" and engine.batch_stats() is None
    assert tuple(engine.runtimes) == engine.models == (ORIGINAL,)
    with pytest.raises(EngineUnavailableError):  # not loaded until start()
        engine.components


def test_a_runtime_per_loaded_family_and_jobs_for_others_are_refused(tmp_path) -> None:
    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "models": list(ALL)})
    engine = VllmEngine(settings)
    assert tuple(engine.runtimes) == ALL and all(engine.runtimes[m].family.id == m for m in ALL)
    engine._loaded = True
    for runtime in engine.runtimes.values():
        runtime.llm, runtime.components = object(), SimpleNamespace(family=runtime.family)
    assert engine.components_of(TURBO).family.id == TURBO
    assert engine.components.family.id == ORIGINAL  # the first loaded
    settings_one = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                         "models": [TURBO]})
    only_turbo = VllmEngine(settings_one)
    with pytest.raises(EngineError, match="has not loaded the model chatterbox-multilingual"):
        only_turbo.components_of(MULTILINGUAL)


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
    rows = await _rows(engine, _job(a, exaggeration=0.5))
    assert rows.shape == (builder.cond_rows, 1024) == (34, 1024)
    assert torch.equal(rows, builder.conditioning(a.conditionals.t3, 0.5))
    cache = engine.runtimes[ORIGINAL].rows
    cached = cache.cached("key-a")
    # An attacker sweeping exaggeration (a free float) must not make the cache useless.
    for i in range(50):
        other = await _rows(engine, _job(a, exaggeration=0.3 + i * 0.0137))
        assert cache.cached("key-a") is cached and len(cache) == 1
    torch.testing.assert_close(other[:-1], rows[:-1])  # the emotion row is the only one it changes
    assert torch.equal(other, builder.conditioning(a.conditionals.t3, 0.3 + 49 * 0.0137))
    await _rows(engine, _job(b, exaggeration=0.5))
    assert cache.keys() == ["key-b"]  # bounded by voice_cache_size, LRU


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
    waiters = [asyncio.create_task(_rows(engine, _job(voice, exaggeration=e))) for e in (0.4, 0.6, 0.8)]
    ticks = 0
    while ticks < 5:  # the event loop still runs while the Perceiver works
        await asyncio.sleep(0.01)
        ticks += 1
    assert not any(w.done() for w in waiters)
    gate.set()
    results = await asyncio.gather(*waiters)
    assert len(calls) == 1 and calls[0] != loop_thread
    assert not torch.equal(results[0], results[2])


async def test_one_waiter_cancelled_spares_the_others(engine, builder, monkeypatch) -> None:
    gate = threading.Event()
    real = builder.voice_rows
    monkeypatch.setattr(builder, "voice_rows", lambda cond: (gate.wait(5), real(cond))[1])
    voice = _voice("d", 4)
    first = asyncio.create_task(_rows(engine, _job(voice)))
    second = asyncio.create_task(_rows(engine, _job(voice)))
    await asyncio.sleep(0.02)
    first.cancel()
    gate.set()
    assert (await second).shape == (34, 1024)
    with pytest.raises(asyncio.CancelledError):
        await first


@pytest.mark.parametrize("cfg_weight", [0.0, 0.3, 0.5, 1.0, 2.5])
async def test_each_request_carries_its_own_cfg_weight(engine, cfg_weight: float) -> None:
    text = [255, 10, 20, 30, 0]
    t3 = engine.runtimes[ORIGINAL].t3
    job = _job(_voice("a", 1), cfg_weight=cfg_weight)
    prompt = t3.prompt(await _rows(engine, job), text, job.params)
    positions, delta = layout.mrope_positions(prompt.token_ids)
    rows = layout.decode_positions(positions + 0, max_position=2048, speech_positions=4100, text_vocab=704)
    assert torch.equal(rows.cfg_weight, torch.full_like(rows.cfg_weight, cfg_weight))
    # a decode step of this request (vLLM: context length + delta) sees the same weight
    step = torch.full((3, 1), len(prompt.token_ids) + 5 + delta)
    decoded = layout.decode_positions(step, max_position=2048, speech_positions=4100, text_vocab=704)
    assert float(decoded.cfg_weight[0]) == pytest.approx(cfg_weight)
    assert int(decoded.speech_index[0]) == 6
    # the weight changes only the two side-channel ids, never the rows
    base_job = _job(_voice("a", 1), cfg_weight=0.0)
    base = t3.prompt(await _rows(engine, base_job), text, base_job.params)
    assert torch.equal(prompt.embeds, base.embeds)
    assert prompt.token_ids[2:] == base.token_ids[2:]


async def test_unrepresentable_cfg_weight_is_a_client_error(engine) -> None:
    job = _job(_voice("a", 1), cfg_weight=6.0)
    with pytest.raises(InvalidRequestError) as err:
        engine.runtimes[ORIGINAL].t3.prompt(await _rows(engine, job), [255, 1, 0], job.params)
    assert err.value.status_code == 400 and err.value.param == "cfg_weight"


async def test_a_too_long_prompt_names_the_input_not_cfg_weight(engine) -> None:
    job = _job(_voice("a", 1), cfg_weight=0.5)
    with pytest.raises(InvalidRequestError) as err:
        engine.runtimes[ORIGINAL].t3.prompt(await _rows(engine, job), [255] + [7] * layout.MAX_PROMPT + [0],
                                            job.params)
    assert err.value.status_code == 400 and err.value.param == "input"


async def test_health_includes_every_familys_engine_and_vocoder(tmp_path) -> None:
    class Healthy:
        async def check_health(self):
            return None

        def shutdown(self):
            self.down = True

    class DeadVocoder:
        def check_health(self):
            raise EngineUnavailableError("the vocoder loop died: boom")

        async def close(self):
            self.closed = True

    class DeadCore(Healthy):
        async def check_health(self):
            raise RuntimeError("EngineCore encountered an issue")

    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "models": list(ALL)})
    engine = VllmEngine(settings)
    for runtime in engine.runtimes.values():
        runtime.llm = Healthy()
    await engine.check_health()  # engines up, vocoders not built yet
    engine._loaded = True
    engine.runtimes[MULTILINGUAL].vocoder = DeadVocoder()
    with pytest.raises(EngineUnavailableError, match="vocoder"):
        await engine.check_health()
    engine.runtimes[MULTILINGUAL].vocoder = None
    engine.runtimes[TURBO].llm = DeadCore()
    with pytest.raises(RuntimeError, match="EngineCore"):
        await engine.check_health()
    engine.runtimes[MULTILINGUAL].vocoder = DeadVocoder()
    llms = [r.llm for r in engine.runtimes.values()]
    await engine.close()
    assert all(llm.down for llm in llms) and engine.runtimes[MULTILINGUAL].vocoder.closed
    assert all(r.llm is None for r in engine.runtimes.values())


def test_batch_stats_add_up_every_familys_vocoder(engine) -> None:
    from gateway.engine.vllm.vocoder import VocoderStats

    a = VocoderStats(batches=2, rows=5, windows_dropped=1, busy_s=1.5, audio_s=4.0, rows_per_batch={2: 1, 3: 1},
                     hift_frames=300, hift_eager_frames=60)
    b = VocoderStats(batches=1, rows=3, busy_s=0.5, audio_s=2.0, rows_per_batch={3: 1}, hift_frames=100)
    paused = SimpleNamespace(holds=4, held_s=0.25)  # a T3Pause's counters (t3_first_window_pause_ms)
    engine.runtimes[ORIGINAL].vocoder = SimpleNamespace(stats=a, t3_pause=None)
    engine.runtimes["extra"] = SimpleNamespace(vocoder=SimpleNamespace(stats=b, t3_pause=paused), llm=None)
    stats = engine.batch_stats()
    assert (stats.batches, stats.rows, stats.rows_dropped, stats.busy_s, stats.audio_s) == (3, 8, 1, 2.0, 6.0)
    assert stats.rows_per_batch == {2: 1, 3: 2}
    assert (stats.hift_frames, stats.hift_eager_frames) == (400, 60)
    assert (stats.t3_pauses, stats.t3_paused_s) == (4, 0.25)
    assert stats.t3_steps == 0  # no engine thread: the engine core is a process


def test_batch_stats_carry_the_engine_threads_step_clock_once(engine) -> None:
    from llm_engine_double import LLMEngineDouble

    from gateway.engine.vllm.engine_thread import ThreadedLLM
    from gateway.engine.vllm.vocoder import VocoderStats

    llm = ThreadedLLM(lambda: LLMEngineDouble([1]), name="test-engine")
    try:
        llm.clock.steps, llm.clock.wall_s, llm.clock.cpu_s = 10, 0.5, 0.125
        engine.runtimes[ORIGINAL].vocoder = SimpleNamespace(stats=VocoderStats(), t3_pause=None)
        engine.runtimes[ORIGINAL].llm = llm
        engine.runtimes["extra"] = SimpleNamespace(vocoder=None, llm=llm)  # one engine thread for both
        stats = engine.batch_stats()
        assert (stats.t3_steps, stats.t3_step_s, stats.t3_step_cpu_s) == (10, 0.5, 0.125)
    finally:
        engine.runtimes[ORIGINAL].llm = None
        llm.shutdown()


@pytest.mark.parametrize("model, vocab, weights", [
    (ORIGINAL, 8194, "t3_cfg.safetensors"),
    (MULTILINGUAL, layout.IdLayout(2454).logits_width, "t3_mtl23ls_v2.safetensors"),
    (TURBO, 6563, "t3_turbo_v1.safetensors"),
])
def test_model_dir_links_only_the_t3_weights(tmp_path, model: str, vocab: int, weights: str) -> None:
    family = FAMILIES[model]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in family.checkpoint_files:
        (ckpt / name).write_bytes(b"x")
    model_dir = write_model_dir(tmp_path / "model", family, ckpt / family.t3_file)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert (model_dir / "model.safetensors").resolve() == (ckpt / weights).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == vocab
    assert write_model_dir(tmp_path / "model", family, ckpt / family.t3_file) == model_dir  # idempotent
    other = tmp_path / "ckpt2"
    other.mkdir()
    (other / weights).write_bytes(b"y")
    relinked = write_model_dir(tmp_path / "model", family, other / family.t3_file)
    assert (relinked / "model.safetensors").resolve() == (other / weights).resolve()


def test_each_family_gets_its_own_model_dir_under_the_cache(engine, tmp_path) -> None:
    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path),
                                                     "models": list(ALL)})
    eng = VllmEngine(settings)
    dirs = set()
    for model in ALL:
        ckpt = tmp_path / model
        ckpt.mkdir()
        (ckpt / FAMILIES[model].t3_file).write_bytes(b"x")
        dirs.add(eng._model_dir(FAMILIES[model], ckpt).relative_to(tmp_path / "t3_vllm").as_posix())
    assert dirs == {"dummy-seed0", "dummy-seed0_chatterbox-turbo", "dummy-seed0_chatterbox-multilingual"}


# --- the KV cache plan -----------------------------------------------------------------------


def test_kv_bytes_per_token_of_each_family() -> None:
    # 30 layers x K and V x 32 heads (both CFG streams) x 64 x bf16; GPT-2: 24 x 2 x 16 x 64 x 2
    assert kv_bytes_per_token(FAMILIES[ORIGINAL]) == kv_bytes_per_token(FAMILIES[MULTILINGUAL]) == 240 * 1024
    assert kv_bytes_per_token(FAMILIES[TURBO]) == 96 * 1024
    # vllm_kv_cache_dtype fp8: a byte a value
    assert kv_bytes_per_token(FAMILIES[ORIGINAL], "fp8") == 120 * 1024
    assert kv_bytes_per_token(FAMILIES[TURBO], "fp8") == 48 * 1024


def _costs(models) -> dict[str, int]:
    return {m: kv_bytes_per_token(FAMILIES[m]) for m in models}


def test_one_engine_keeps_the_settings_as_they_were(tmp_path) -> None:
    settings = load_settings(environ={}, overrides={"cache_dir": str(tmp_path)})
    (share,) = kv_cache_plan(settings, _costs([ORIGINAL]), 140 * GIB).values()
    assert share.engine_kwargs() == {"gpu_memory_utilization": 0.5} and share.tokens is None
    exact = load_settings(environ={}, overrides={"cache_dir": str(tmp_path), "vllm_kv_cache_memory_bytes": 8 * GIB})
    (share,) = kv_cache_plan(exact, _costs([TURBO]), 140 * GIB).values()
    # vLLM only checks that the declared share is free at start: the exact size decides
    assert share.engine_kwargs() == {"kv_cache_memory_bytes": 8 * GIB, "gpu_memory_utilization": EXACT_KV_UTILIZATION}
    assert share.tokens == 8 * GIB // (96 * 1024)


def test_several_engines_split_the_share_in_equal_bytes(tmp_path) -> None:
    settings = load_settings(environ={}, overrides={"cache_dir": str(tmp_path), "vllm_gpu_memory_utilization": 0.5})
    plan = kv_cache_plan(settings, _costs(ALL), 140 * GIB)
    assert list(plan) == list(ALL)
    each = (70 * GIB - 3 * ENGINE_OVERHEAD_BYTES) // 3
    for model, share in plan.items():
        assert share.engine_kwargs() == {"kv_cache_memory_bytes": each, "gpu_memory_utilization": EXACT_KV_UTILIZATION}
    # Turbo's cheaper tokens: 2.5 times as many in the same bytes
    assert plan[TURBO].tokens == each // (96 * 1024) and plan[ORIGINAL].tokens == each // (240 * 1024)
    assert plan[TURBO].describe()["kv_cache_gib"] == round(each / GIB, 2)
    exact = load_settings(environ={}, overrides={"cache_dir": str(tmp_path), "vllm_kv_cache_memory_bytes": 30 * GIB})
    assert {s.kv_cache_bytes for s in kv_cache_plan(exact, _costs(ALL[1:]), 140 * GIB).values()} == {15 * GIB}


def test_a_share_too_small_for_one_sequence_stops_the_start(tmp_path) -> None:
    settings = load_settings(environ={}, overrides={"cache_dir": str(tmp_path), "vllm_gpu_memory_utilization": 0.1})
    with pytest.raises(SettingsError, match="vllm_gpu_memory_utilization"):
        kv_cache_plan(settings, _costs(ALL), 80 * GIB)  # 8 GiB less 12 GiB of engines: nothing left
    tiny = load_settings(environ={}, overrides={"cache_dir": str(tmp_path), "vllm_kv_cache_memory_bytes": GIB // 2})
    with pytest.raises(SettingsError, match="chatterbox needs at least 0.47 GiB"):
        kv_cache_plan(tiny, _costs([ORIGINAL, TURBO]), 80 * GIB)


def test_every_part_of_the_start_is_logged_with_its_time(engine) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        with engine._part(TURBO, "modules") as part:
            part["note"] = 1
        engine._record(TURBO, "t3_engine", 12.34, engine_pids=[7])
    events = [e for e in logs if e["event"] == "engine_start_part"]
    assert [(e["family"], e["part"]) for e in events] == [(TURBO, "modules"), (TURBO, "t3_engine")]
    assert events[0]["note"] == 1 and events[1]["seconds"] == 12.3 and events[1]["engine_pids"] == [7]
    assert engine.start_parts == [{k: v for k, v in e.items() if k not in ("event", "log_level")} for e in events]
    with capture_logs() as logs, pytest.raises(RuntimeError):
        with engine._part(ORIGINAL, "vocoder"):
            raise RuntimeError("no graphs today")
    failed = [e for e in logs if e["event"] == "engine_start_failed"]
    assert [(e["family"], e["part"], e["error"]) for e in failed] == [(ORIGINAL, "vocoder", "RuntimeError: no graphs today")]


def test_the_engine_arguments_carry_the_stream_interval(engine: VllmEngine, tmp_path, monkeypatch) -> None:
    """``vllm_stream_interval``, ``vllm_max_num_batched_tokens``, ``vllm_cascade_attention`` and ``vllm_kv_cache_dtype`` reach vLLM's engine arguments (a stand-in ``vllm`` module
    records them: vLLM is not installed on CPU machines)."""
    import types

    seen: dict = {}

    class AsyncEngineArgs:
        def __init__(self, **kwargs) -> None:
            seen.update(kwargs)

        def create_engine_config(self, context):
            return context

    fake = types.ModuleType("vllm")
    fake.AsyncEngineArgs = AsyncEngineArgs
    usage = types.ModuleType("vllm.usage.usage_lib")
    usage.UsageContext = SimpleNamespace(ENGINE_CONTEXT="engine")
    for name, module in (("vllm", fake), ("vllm.usage", types.ModuleType("vllm.usage")), ("vllm.usage.usage_lib", usage)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(engine, "_model_dir", lambda family, directory: tmp_path)
    assert engine._engine_config(FAMILIES[ORIGINAL], tmp_path, {}) == "engine"
    assert seen["stream_interval"] == 1 and seen["model"] == str(tmp_path)  # the default: every token
    assert seen["max_num_batched_tokens"] is None  # vLLM's own default for an engine context
    assert seen["disable_cascade_attn"] is True  # vLLM's default, unless vllm_cascade_attention
    assert seen["kv_cache_dtype"] == "auto"
    engine.settings = load_settings(environ={}, overrides={"vllm_stream_interval": 4,
                                                           "vllm_max_num_batched_tokens": 8192,
                                                           "vllm_cascade_attention": True,
                                                           "vllm_kv_cache_dtype": "fp8"})
    engine._engine_config(FAMILIES[ORIGINAL], tmp_path, {})
    assert seen["stream_interval"] == 4 and seen["max_num_batched_tokens"] == 8192
    assert seen["disable_cascade_attn"] is False and seen["kv_cache_dtype"] == "fp8"
    with pytest.raises(SettingsError):
        load_settings(environ={}, overrides={"vllm_stream_interval": 0})


@pytest.mark.parametrize("priority", ["normal", "high"])
def test_an_engine_core_thread_runs_on_a_stream_of_the_set_priority(engine: VllmEngine, monkeypatch,
                                                                    priority: str) -> None:
    """``vllm_engine_stream_priority`` reaches the engine thread (vLLM stood in for: its
    ``AsyncLLM`` module must import, the thread's engine is recorded instead of started)."""
    import types

    from gateway.engine.vllm import engine_thread

    started: list[dict] = []
    monkeypatch.setattr(engine_thread.ThreadedLLM, "from_vllm_config",
                        classmethod(lambda cls, config, **kw: started.append({"config": config, **kw}) or "llm"))
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = None  # never used with the thread
    for name in ("vllm", "vllm.v1", "vllm.v1.engine"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.async_llm", async_llm)
    engine.settings = load_settings(environ={}, overrides={"vllm_engine_core": "thread",
                                                           "vllm_engine_stream_priority": priority})
    assert engine._start_llm(ORIGINAL, "config") == "llm"
    assert started == [{"config": "config", "priority": priority}]


async def test_building_a_prompt_marks_its_parts_on_the_timeline(engine) -> None:
    """The first-audio timeline itemises the prompt (text ids, the voice's rows) before T3."""
    from gateway.observability.timeline import Timeline

    runtime = engine.runtimes[ORIGINAL]
    runtime.components = SimpleNamespace(front_end=SimpleNamespace(ids=lambda text, language: [255, 7, 8, 0]))
    trace = Timeline()
    prompt = await engine._prompt(runtime, _job(_voice("a", 1)), "hi", trace)
    assert [stage for stage, _, _ in trace.rows()] == ["t3 text ids", "t3 voice rows"]
    assert len(prompt.token_ids) > 4
