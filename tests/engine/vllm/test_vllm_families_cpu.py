"""Every family through the vLLM engine's own code on the CPU: the real text front ends
(Turbo's GPT-2 tokenizer with its tags, Multilingual's per-language one with its ``[xx]``
prefix), the real T3 fronts (prompt rows, placeholder ids, decoding controls), the real
vocoder loop with each family's S3Gen (Turbo: mean-flow, 2 steps), and a stand-in for vLLM's
``AsyncLLM`` (vLLM cannot run here) that records what it was asked and streams speech token
deltas back. The GPU runs the same code with vLLM: tests/http/test_engine_e2e_vllm.py."""

from __future__ import annotations

import asyncio
import functools
import itertools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import torch
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import Conditionals
from llm_engine_double import LLMEngineDouble

from gateway.engine.base import GenerationParams, SynthesisJob, T3Stats, Voice
from gateway.engine.checkpoint import dummy_text
from gateway.engine.checkpoint.dummy import tokenizer_json
from gateway.engine.checkpoint.text_front_ends import load_front_end
from gateway.engine.vllm.engine import VllmEngine
from gateway.engine.vllm.engine_thread import ThreadedLLM
from gateway.engine.vllm.t3 import layout
from gateway.engine.vllm.t3.families import S3GEN_SILENCE, LlamaFamilyT3, T3Sampling, TurboFamilyT3, family_t3
from gateway.engine.vllm.t3.prompt import T3PromptBuilder
from gateway.engine.vllm.t3.turbo import TurboPromptBuilder
from gateway.engine.vllm.vocoder import Vocoder
from gateway.engine.vllm.vocoder_windows import WindowPolicy
from gateway.engine.vllm.voice_rows import VoiceRowsCache
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO
from gateway.settings import load_settings
from gateway.tools import parity_vocoder

ALL = (ORIGINAL, TURBO, MULTILINGUAL)
PROMPT_TOKENS = {ORIGINAL: 150, MULTILINGUAL: 150, TURBO: 375}
POLICY = WindowPolicy(first_tokens=6, tokens=8, left_context=4, final_merge_tokens=8)
LAUGH_ID = 50257 + 18  # Turbo's added tokens in id order; [laugh] is the last of 19


@pytest.fixture(scope="module")
def front_ends(tmp_path_factory) -> dict[str, object]:
    """Each family's text front end, from the tokenizer files its dummy checkpoint writes."""
    root = tmp_path_factory.mktemp("tokenizers")
    for model in ALL:
        (root / model).mkdir()
    (root / ORIGINAL / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    dummy_text.write_turbo_tokenizer(root / TURBO)
    mtl = FAMILIES[MULTILINGUAL]
    (root / MULTILINGUAL / mtl.tokenizer_files[0]).write_text(dummy_text.multilingual_tokenizer_json(), encoding="utf-8")
    (root / MULTILINGUAL / "Cangjie5_TC.json").write_text(dummy_text.cangjie_table_json(), encoding="utf-8")
    return {m: load_front_end(root / m, FAMILIES[m]) for m in ALL}


@pytest.fixture(scope="module")
def fronts() -> dict[str, object]:
    """Each family's T3 front with random CPU modules (what ``family_t3`` builds from a checkpoint)."""
    from gateway.engine.checkpoint.modules import t3_config

    torch.manual_seed(0)
    original = LlamaFamilyT3(FAMILIES[ORIGINAL], T3PromptBuilder())
    mtl = LlamaFamilyT3(FAMILIES[MULTILINGUAL], T3PromptBuilder(t3_config(FAMILIES[MULTILINGUAL])))
    turbo = TurboFamilyT3(FAMILIES[TURBO], TurboPromptBuilder())
    return {ORIGINAL: original, TURBO: turbo, MULTILINGUAL: mtl}


@pytest.fixture(scope="module")
def s3gens():
    """S3Gen with random weights: the original's (shared by Multilingual here) and Turbo's mean-flow one."""
    from chatterbox.models.s3gen import S3Gen

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    regular, meanflow = S3Gen().eval(), S3Gen(meanflow=True).eval()
    yield {ORIGINAL: regular, MULTILINGUAL: regular, TURBO: meanflow}
    torch.set_num_threads(threads)


class StandInLLM:
    """``AsyncLLM``'s surface the engine uses: ``generate`` streams deltas of ``tokens`` (cut at
    the request's ``max_tokens``), ``check_health``, ``shutdown``; records every request."""

    def __init__(self, tokens: list[int], per_step: int = 3, delay_s: float = 0.0,
                 gate: asyncio.Event | None = None) -> None:
        self.tokens, self.per_step, self.delay_s = tokens, per_step, delay_s
        self.gate = gate
        """When given, no token comes before it is set (a request waiting in vLLM's queue)."""
        self.requests: list[tuple[dict, T3Sampling, str]] = []
        self.aborted: list[str] = []

    async def generate(self, prompt: dict, sampling: T3Sampling, request_id: str):
        self.requests.append((prompt, sampling, request_id))
        tokens = self.tokens[:sampling.max_tokens]
        try:
            if self.gate is not None:
                await self.gate.wait()
            for i in range(0, len(tokens), self.per_step):
                await asyncio.sleep(self.delay_s)
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens[i:i + self.per_step])])
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request_id)  # AsyncLLM aborts the request here
            raise

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        pass


def _voice(model: str, ref: dict, seed: int = 1) -> Voice:
    g = torch.Generator().manual_seed(seed)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, PROMPT_TOKENS[model]), generator=g),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    return Voice("v", f"voice-{model}", Conditionals(cond, ref))


@pytest.fixture
async def engine(tmp_path, front_ends, fronts, s3gens, monkeypatch):
    """A VllmEngine with all three families as ``start()`` leaves them, but vLLM stood in for."""
    monkeypatch.setattr(T3Sampling, "to_vllm", lambda self: self)  # the stand-in takes our numbers
    settings = load_settings(environ={}, overrides={
        "load_format": "dummy", "cache_dir": str(tmp_path), "models": list(ALL), "watermark": False,
        "flow_steps": 1, "max_speech_tokens": 64, "vllm_max_model_len": 1024})
    eng = VllmEngine(settings)
    for model, runtime in eng.runtimes.items():
        runtime.components = SimpleNamespace(front_end=front_ends[model], tokenizer=front_ends[model].tokenizer,
                                             family=runtime.family, builtin_conditionals=None, watermarker=None)
        runtime.t3 = fronts[model]
        runtime.rows = VoiceRowsCache(runtime.t3.voice_rows, 4)
        runtime.vocoder = Vocoder(s3gens[model], settings, policy=POLICY, flow_steps=runtime.family.flow_steps)
        await runtime.vocoder.start()
    eng._loaded = True
    yield eng
    await eng.close()


@pytest.fixture(scope="module")
def refs(s3gens) -> dict[str, dict]:
    s3gens[ORIGINAL].float()
    s3gens[TURBO].float()
    return {m: parity_vocoder.reference_dict(s3gens[m], 12, 120.0 + 40 * i, i) for i, m in enumerate(ALL)}


def _speech(seed: int, n: int) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def _run(engine: VllmEngine, job: SynthesisJob) -> tuple[np.ndarray, int]:
    samples, tokens = [], 0
    async for chunk in engine.synthesize(job):
        samples.append(chunk.samples)
        tokens += chunk.speech_tokens
    return np.concatenate(samples) if samples else np.zeros(0, np.float32), tokens


# --- the fronts ------------------------------------------------------------------------------


def test_turbo_honours_only_its_controls(fronts) -> None:
    """Turbo: upstream inference_turbo's controls; a client's min_p, CFG weight and
    exaggeration change nothing (accepted and ignored, as the model card says)."""
    t3 = fronts[TURBO]
    a = GenerationParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3, min_p=0.2, cfg_weight=0.9,
                         exaggeration=1.5)
    b = GenerationParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3, min_p=0.0, cfg_weight=0.0,
                         exaggeration=0.1)
    s = t3.sampling(a, max_tokens=40, seed=5, fixed_length=False)
    assert s == t3.sampling(b, max_tokens=40, seed=5, fixed_length=False)
    assert (s.top_k, s.min_p, s.min_tokens, s.temperature, s.top_p, s.repetition_penalty) == (1000, 0.0, 1, 0.7, 0.9, 1.3)
    assert t3.sampling(a, max_tokens=40, seed=5, fixed_length=True).min_tokens == 40
    rows = torch.randn(376, 1024)
    assert t3.request_rows(rows, a) is rows and t3.tail_tokens == (S3GEN_SILENCE,) * 3
    original = fronts[ORIGINAL].sampling(a, max_tokens=40, seed=5, fixed_length=False)
    assert (original.top_k, original.min_p, original.min_tokens) == (0, 0.2, 0)
    assert fronts[ORIGINAL].tail_tokens == () == fronts[MULTILINGUAL].tail_tokens


def test_text_limits_per_family(fronts) -> None:
    assert fronts[ORIGINAL].max_text_tokens(2048) == layout.MAX_PROMPT - 1 - 34 - 4
    assert fronts[MULTILINGUAL].max_text_tokens(2048) == layout.MAX_PROMPT - 1 - 34 - 4
    assert fronts[TURBO].max_text_tokens(1024) == 1024 - 376 - 2  # the voice's 376 rows, start, one token
    assert fronts[TURBO].max_text_tokens(4096) == 2048


def test_family_t3_builds_each_front_from_a_checkpoints_tensors(fronts) -> None:
    for model in ALL:
        state = fronts[model].builder.state_dict()
        built = family_t3(FAMILIES[model], state)
        assert type(built) is type(fronts[model]) and built.family.id == model
        for key, value in built.builder.state_dict().items():
            assert torch.equal(value, state[key])


def test_multilingual_text_has_its_language_prefix_and_upstreams_ids(front_ends) -> None:
    """The ids are upstream MTLTokenizer's for the job's language, framed by start/stop text
    tokens as upstream ``generate()`` pads them; the ``[xx]`` prefix token follows the start."""
    front = front_ends[MULTILINGUAL]
    tokenizer = front.tokenizer
    for language, text in (("fr", "Bonjour à tous."), ("de", "Guten Tag!"), ("en", "Hello there.")):
        ids = front.ids(text, language)
        upstream = tokenizer.text_to_tokens(text, language_id=language)[0].tolist()
        assert ids == [255, *upstream, 0]
        assert ids[1] == tokenizer.tokenizer.token_to_id(f"[{language}]")
        assert max(ids) < 2454
    assert front.ids("Bonjour", "fr") != front.ids("Bonjour", "de")


# --- whole jobs ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [True, False])
async def test_turbo_job_tags_reach_gpt2_and_the_silence_tail_reaches_the_vocoder(engine, refs, streaming) -> None:
    n = 17
    llm = engine.runtimes[TURBO].llm = StandInLLM(_speech(1, n) + [6562])
    voice = _voice(TURBO, refs[TURBO])
    job = SynthesisJob("t", ("Well [laugh] that went fine.",), voice,
                       GenerationParams(temperature=0.8, top_p=0.95, seed=3), model=TURBO, streaming=streaming)
    audio, tokens = await _run(engine, job)
    (prompt, sampling, _), = llm.requests
    text_ids = engine.runtimes[TURBO].components.front_end.ids("Well [laugh] that went fine.", "en")
    assert LAUGH_ID in text_ids and text_ids.count(LAUGH_ID) == 1  # one added token, never split
    t3 = engine.runtimes[TURBO].t3
    expected = t3.builder.build(t3.builder.conditioning(voice.conditionals.t3), text_ids)
    # sent in the served dtype (bf16): half the bytes for vLLM to ship and hash, the values its own cast gives
    assert prompt["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(prompt["prompt_embeds"], expected.embeds.to(torch.bfloat16))
    assert prompt["prompt_token_ids"] == expected.token_ids
    assert prompt["prompt_embeds"].shape[0] == 1 + 375 + len(text_ids) + 1
    assert (sampling.top_k, sampling.min_p, sampling.min_tokens) == (1000, 0.0, 1)
    # usage counts T3's tokens; the audio holds them and the three silence tokens
    assert tokens == n and audio.shape[0] == (n + 3) * 2 * 480


@pytest.mark.slow
async def test_original_job_speaks_its_tokens_and_nothing_more(engine, refs) -> None:
    n = 15
    llm = engine.runtimes[ORIGINAL].llm = StandInLLM(_speech(2, n) + [6562])
    voice = _voice(ORIGINAL, refs[ORIGINAL])
    job = SynthesisJob("o", ("Hello there.", "Again."), voice, GenerationParams(cfg_weight=0.3, seed=1),
                       model=ORIGINAL, streaming=True)
    audio, tokens = await _run(engine, job)
    assert tokens == 2 * n and audio.shape[0] == 2 * n * 2 * 480
    # two T3 requests, each's 15 speech tokens and stop id in deliveries of 3: none left open
    assert engine.t3_stats()[ORIGINAL] == T3Stats(waiting=0, decoding=0, requests=2, tokens=2 * n, deliveries=2 * 6)
    assert len(llm.requests) == 2 and llm.requests[0][2] != llm.requests[1][2]
    seeds = [s.seed for _, s, _ in llm.requests]
    assert seeds[0] != seeds[1]  # each chunk its own seed, derived from the request's
    # a seeded chunk prefills its whole prompt (no prefix-cache read: the same seed, the same tokens)
    assert all(s.vllm_fields()["skip_reading_prefix_cache"] is True for _, s, _ in llm.requests)
    unseeded = SynthesisJob("u", ("Hello there.",), voice, GenerationParams(cfg_weight=0.3), model=ORIGINAL,
                            streaming=True)
    await _run(engine, unseeded)
    fields = llm.requests[-1][1].vllm_fields()
    assert fields["seed"] is None and fields["skip_reading_prefix_cache"] is None  # vLLM's default: cache on
    positions, _ = layout.mrope_positions(llm.requests[0][0]["prompt_token_ids"])
    rows = layout.decode_positions(positions, max_position=2048, speech_positions=4100, text_vocab=704)
    assert float(rows.cfg_weight[0]) == pytest.approx(0.3)


@pytest.mark.slow
async def test_the_engine_speaks_through_an_engine_core_in_a_thread_and_aborts_there(engine, refs) -> None:
    """``vllm_engine_core = "thread"``: the same job over ThreadedLLM (an in-process engine,
    here a stand-in), then a job closed after its first audio aborts its request there."""
    n = 15
    double = LLMEngineDouble(_speech(2, n) + [6562], per_step=3)
    runtime = engine.runtimes[ORIGINAL]
    runtime.llm = ThreadedLLM(lambda: double, name="test-engine")
    voice = _voice(ORIGINAL, refs[ORIGINAL])
    job = SynthesisJob("t", ("Hello there.",), voice, GenerationParams(seed=1), model=ORIGINAL, streaming=True)
    audio, tokens = await _run(engine, job)
    assert tokens == n and audio.shape[0] == n * 2 * 480
    assert len(double.added) == 1 and double.aborted == []
    runtime.llm.shutdown()

    slow = LLMEngineDouble(_speech(3, 60), per_step=1, step_s=0.02)
    runtime.llm = ThreadedLLM(lambda: slow, name="test-engine-2")
    chunks = engine.synthesize(SynthesisJob("c", ("A long one.",), voice, GenerationParams(), model=ORIGINAL,
                                            streaming=True))
    assert (await chunks.__anext__()).samples.size
    await chunks.aclose()
    for _ in range(200):
        if slow.aborted and runtime.vocoder.open_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert slow.aborted == [slow.added[0][0]] and not slow.live and runtime.vocoder.open_streams == 0
    runtime.llm.shutdown()
    assert slow.shut_down.is_set()


@pytest.mark.slow
async def test_multilingual_job_builds_the_prompt_in_its_language(engine, refs) -> None:
    n = 12
    llm = engine.runtimes[MULTILINGUAL].llm = StandInLLM(_speech(3, n))
    voice = _voice(MULTILINGUAL, refs[MULTILINGUAL])
    text = "Bonjour à tous."
    job = SynthesisJob("m", (text,), voice, GenerationParams(repetition_penalty=2.0, seed=2), model=MULTILINGUAL,
                       language="fr", streaming=False)
    audio, tokens = await _run(engine, job)
    assert tokens == n and audio.shape[0] == n * 2 * 480
    (prompt, sampling, _), = llm.requests
    ids = engine.runtimes[MULTILINGUAL].components.front_end.ids(text, "fr")
    wide = layout.IdLayout(2454)
    positions, _ = layout.mrope_positions(prompt["prompt_token_ids"], wide)
    rows = layout.decode_positions(positions, max_position=2048, speech_positions=4100, text_vocab=2454)
    assert rows.text_token[rows.is_text].tolist() == ids  # the [fr] prefix and upstream's ids, framed
    assert prompt["prompt_token_ids"][0] >= wide.cond_digit_base  # the wide layout's CFG digits
    assert sampling.repetition_penalty == 2.0 and sampling.top_k == 0


@pytest.mark.slow
async def test_closing_a_job_aborts_its_t3_request_and_frees_the_vocoder(engine, refs) -> None:
    runtime = engine.runtimes[TURBO]
    gate = asyncio.Event()
    llm = runtime.llm = StandInLLM(_speech(4, 60), per_step=1, delay_s=0.05, gate=gate)
    job = SynthesisJob("c", ("A long one.",), _voice(TURBO, refs[TURBO]), GenerationParams(), model=TURBO,
                       streaming=True)
    chunks = engine.synthesize(job)
    first_chunk = asyncio.ensure_future(chunks.__anext__())
    while not llm.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert engine.t3_stats()[TURBO] == T3Stats(waiting=1, decoding=0, requests=1)  # sent, no token yet
    gate.set()
    first = await first_chunk
    assert first.samples.size
    stats = engine.t3_stats()[TURBO]
    assert (stats.waiting, stats.decoding) == (0, 1) and stats.tokens == stats.deliveries > 0
    await chunks.aclose()
    assert llm.aborted == [llm.requests[0][2]]
    stats = engine.t3_stats()[TURBO]
    assert (stats.waiting, stats.decoding, stats.requests) == (0, 0, 1)  # an aborted request leaves no count
    for _ in range(100):
        if runtime.vocoder.open_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert runtime.vocoder.open_streams == 0


@pytest.mark.slow
async def test_an_over_long_chunk_is_refused_per_family(engine, refs) -> None:
    from gateway.errors import InvalidRequestError

    runtime = engine.runtimes[TURBO]
    runtime.llm = StandInLLM([])
    limit = engine.max_text_tokens(TURBO)
    job = SynthesisJob("l", ("a " * (limit + 5),), _voice(TURBO, refs[TURBO]), GenerationParams(), model=TURBO)
    with pytest.raises(InvalidRequestError) as err:
        await _run(engine, job)
    assert err.value.param == "input" and runtime.llm.requests == []


def test_an_explicit_language_never_imports_the_detector() -> None:
    """GPU machines have no lingua (its wheel cannot travel there): a multilingual request
    that names its language, and a multilingual engine, must never import it."""
    code = ("import sys\n"
            "from gateway.models.families import FAMILIES\n"
            "from gateway.speech.languages import resolve_language\n"
            "import gateway.engine.vllm.engine, gateway.engine.checkpoint.text_front_ends\n"
            "family = FAMILIES['chatterbox-multilingual']\n"
            "assert resolve_language(family, 'fr', 'Bonjour à tous.') == 'fr'\n"
            "assert resolve_language(family, 'pt-BR', 'Olá.') == 'pt'\n"
            "assert 'lingua' not in sys.modules, 'lingua was imported'\n")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
async def test_streams_are_watermarked_through_the_batched_watermark(engine, refs) -> None:
    """``watermark`` on: two streams at once, each window through the engine's batcher (Perth
    on the CPU); the mark changes the audio, not its length, and the batcher is closed with
    the engine."""
    perth = pytest.importorskip("perth")
    from gateway.engine.vllm.watermark_batch import WatermarkBatcher

    n = 40
    voice = _voice(ORIGINAL, refs[ORIGINAL])

    def job(name: str) -> SynthesisJob:
        return SynthesisJob(name, ("Hello there.",), voice, GenerationParams(seed=1), model=ORIGINAL, streaming=True)

    engine.runtimes[ORIGINAL].llm = StandInLLM(_speech(4, n) + [6562])
    plain, _ = await _run(engine, job("plain"))
    batcher = WatermarkBatcher(perth.PerthImplicitWatermarker(device="cpu"), 24000)
    engine.settings = msgspec.structs.replace(engine.settings, watermark=True)
    engine._watermark, engine._mark = batcher, batcher.apply
    engine.runtimes[ORIGINAL].llm = StandInLLM(_speech(4, n) + [6562])
    (a, tokens_a), (b, tokens_b) = await asyncio.gather(_run(engine, job("a")), _run(engine, job("b")))
    assert tokens_a == tokens_b == n and a.shape == b.shape == plain.shape
    snr = 10 * np.log10((plain ** 2).sum() / ((a - plain) ** 2).sum())
    assert 5 < snr < 60, snr  # marked: changed, and still the same speech
    assert batcher.rows >= 4  # every window of both streams (the held-back rest included) went through it
    await engine.close()
    assert engine._watermark is None
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.apply(a[:100])


@pytest.mark.slow
async def test_the_fused_hift_and_the_device_resampled_watermark_stream_through_the_engine(engine, refs, s3gens) -> None:
    """``vocoder_hift_kernels = "fused"`` and ``watermark_resample = "device"`` through the
    engine's own streaming path: the fused HiFT's audio is the plain one's (its CPU formula,
    its folded weights), and every window of two streams is marked on the device path."""
    perth = pytest.importorskip("perth")
    from gateway.engine.vllm.watermark_batch import WatermarkBatcher

    n = 40
    voice = _voice(ORIGINAL, refs[ORIGINAL])

    def job(name: str) -> SynthesisJob:
        return SynthesisJob(name, ("Hello there.",), voice, GenerationParams(seed=1), model=ORIGINAL, streaming=True)

    runtime = engine.runtimes[ORIGINAL]
    runtime.llm = StandInLLM(_speech(4, n) + [6562])
    plain, _ = await _run(engine, job("plain"))
    await runtime.vocoder.close()
    fused_settings = msgspec.structs.replace(engine.settings, vocoder_hift_kernels="fused")
    runtime.vocoder = Vocoder(s3gens[ORIGINAL], fused_settings, policy=POLICY, flow_steps=runtime.family.flow_steps)
    await runtime.vocoder.start()
    assert runtime.vocoder.batch.hift is not s3gens[ORIGINAL].mel2wav
    runtime.llm = StandInLLM(_speech(4, n) + [6562])
    fused, _ = await _run(engine, job("fused"))
    assert fused.shape == plain.shape
    assert 10 * np.log10((plain ** 2).sum() / max(((fused - plain) ** 2).sum(), 1e-30)) > 90
    batcher = WatermarkBatcher(perth.PerthImplicitWatermarker(device="cpu"), 24000, resample="device")
    engine.settings = msgspec.structs.replace(engine.settings, watermark=True)
    engine._watermark, engine._mark = batcher, batcher.apply
    runtime.llm = StandInLLM(_speech(4, n) + [6562])
    (a, _), (b, _) = await asyncio.gather(_run(engine, job("a")), _run(engine, job("b")))
    assert a.shape == b.shape == plain.shape
    snr = 10 * np.log10((plain ** 2).sum() / ((a - plain) ** 2).sum())
    assert 5 < snr < 60, snr
    assert batcher.rows >= 4


@pytest.mark.slow
async def test_with_watermark_batch_off_each_window_gets_upstreams_own_call(engine, refs, monkeypatch) -> None:
    """``watermark_batch`` off (the A/B lever): the same windows, each through upstream's
    ``apply_watermark`` on a worker thread; the audio equals the batched path's."""
    perth = pytest.importorskip("perth")
    from gateway.engine.vllm import engine as engine_module
    from gateway.engine.vllm.watermark_batch import WatermarkBatcher

    watermarker = perth.PerthImplicitWatermarker(device="cpu")
    calls: list[int] = []
    original = watermarker.apply_watermark
    monkeypatch.setattr(watermarker, "apply_watermark", lambda s, **kw: (calls.append(len(s)), original(s, **kw))[1])
    voice = _voice(ORIGINAL, refs[ORIGINAL])
    engine.settings = msgspec.structs.replace(engine.settings, watermark=True)

    async def run(mark) -> np.ndarray:
        engine._mark = mark
        engine.runtimes[ORIGINAL].llm = StandInLLM(_speech(5, 30) + [6562])
        job = SynthesisJob("w", ("Hello there.",), voice, GenerationParams(seed=1), model=ORIGINAL, streaming=True)
        return (await _run(engine, job))[0]

    alone = await run(functools.partial(engine_module._mark_alone, watermarker))
    assert len(calls) >= 2  # every window (and the held-back rest) had its own call
    batcher = WatermarkBatcher(watermarker, 24000)
    try:
        batched = await run(batcher.apply)
    finally:
        batcher.close()
    assert alone.shape == batched.shape
    assert 10 * np.log10((alone ** 2).sum() / max(((batched - alone) ** 2).sum(), 1e-30)) > 100


# --- the sampler warm-up -------------------------------------------------------------------


class PeakLLM(StandInLLM):
    """The stand-in, counting how many of its requests were in flight at once."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(tokens, per_step=2)
        self.live = self.peak = 0

    async def generate(self, prompt: dict, sampling: T3Sampling, request_id: str):
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            async for out in super().generate(prompt, sampling, request_id):
                yield out
        finally:
            self.live -= 1


@pytest.mark.parametrize("model, top_ps", [(TURBO, [0.95, 1.0]), (ORIGINAL, [0.95]), (MULTILINGUAL, [0.95])])
async def test_the_sampler_warm_up_runs_a_batch_of_each_size_for_every_kernel_variant(engine, refs, model,
                                                                                        top_ps) -> None:
    """vLLM's Triton top-k/top-p kernel compiles per (top-k on, top-p on) and per batch size
    divisible by 16 or not, from 8 rows: each variant a family's requests can reach gets a
    wave of 9 and one of 16 concurrent fixed-length requests (Turbo: top-k always, top-p on
    or off; the others: only a client's top-p reaches the kernel)."""
    from gateway.engine.vllm.t3 import sampler_warmup

    runtime = engine.runtimes[model]
    llm = runtime.llm = PeakLLM(_speech(4, 40))
    job = SynthesisJob("warm-up", ("Warm up.",), _voice(model, refs[model]), GenerationParams(**runtime.family.defaults),
                       model=model, streaming=True)
    waves = await engine._warm_up_sampler(runtime, job)
    assert waves == [f"{n}x top_p={p}" for p in top_ps for n in (9, 16)]
    sizes = [len(list(group)) for _, group in itertools.groupby(llm.requests, key=lambda r: r[1].top_p)]
    assert sizes == [25] * len(top_ps) and llm.peak == 16
    for prompt, sampling, _ in llm.requests:
        assert sampling.max_tokens == sampling.min_tokens == sampler_warmup.WARM_TOKENS and sampling.seed is None
        assert any(sampler_warmup.kernel_flags(sampling))
    assert len({r[2] for r in llm.requests}) == len(llm.requests)
    assert len({id(r[0]["prompt_token_ids"]) for r in llm.requests}) == len(llm.requests), "no list shared"
    assert engine.t3_stats()[model].requests == 0, "warm-up requests are not served requests"


def test_sampler_warm_rows_cover_both_divisibility_classes_within_the_scheduler() -> None:
    from gateway.engine.vllm.t3 import sampler_warmup

    rows = sampler_warmup.WARM_ROWS
    assert min(rows) >= sampler_warmup.KERNEL_MIN_ROWS
    assert {n % 16 == 0 for n in rows} == {True, False}
    assert sampler_warmup.warm_rows(128) == [9, 16]
    assert sampler_warmup.warm_rows(12) == [9], "no batch of 16 in a scheduler of 12"
    assert sampler_warmup.warm_rows(7) == [], "the kernel never runs under 8 rows"
