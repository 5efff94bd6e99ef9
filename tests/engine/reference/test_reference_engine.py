"""The reference engine on dummy weights (real architecture, random values), end to end on CPU.

One engine is loaded for the whole module. Generation is kept tiny (a few speech tokens, two
flow-matching steps); random weights rarely sample the stop token, so max_speech_tokens bounds
every chunk.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.engine.base import SAMPLE_RATE, AudioChunk, Engine, GenerationParams, SynthesisJob, T3Stats, Voice
from gateway.engine.reference.engine import ReferenceEngine
from gateway.errors import EngineUnavailableError, InvalidRequestError
from gateway.settings import Settings
from ops_support import quiet_attempts
from weights_support import cache_with_shared_weights

pytestmark = pytest.mark.slow

SAMPLES_PER_TOKEN = 960  # S3Gen: 2 mel frames per token, 480 samples per frame at 24 kHz


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ReferenceEngine:
    # the suite's dummy checkpoint: written once, not per run (tests/weights_support.py)
    settings = Settings(
        engine="reference", load_format="dummy", device="cpu", flow_steps=2, max_speech_tokens=400, watermark=True,
        cache_dir=cache_with_shared_weights(tmp_path_factory.mktemp("reference")),
    )
    engine = ReferenceEngine(settings)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def voice(engine: ReferenceEngine) -> Voice:
    return Voice(name="builtin", key="builtin", conditionals=engine.builtin_conditionals())


def _job(voice: Voice, *chunks: str, tokens: int = 6, **params: object) -> SynthesisJob:
    return SynthesisJob(
        request_id="test", chunks=chunks, voice=voice, params=GenerationParams(max_speech_tokens=tokens, **params)  # type: ignore[arg-type]
    )


async def _collect(engine: ReferenceEngine, job: SynthesisJob) -> list[AudioChunk]:
    return [chunk async for chunk in engine.synthesize(job)]


async def _wait_idle(engine: ReferenceEngine, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    await asyncio.sleep(0.05)
    while engine.busy:
        assert time.monotonic() < deadline, "the engine kept working after the job was cancelled"
        await asyncio.sleep(0.05)


def test_loaded_from_a_dummy_checkpoint_on_disk(engine: ReferenceEngine) -> None:
    from gateway.engine.checkpoint.dummy import dummy_checkpoint_path, materialize_dummy_checkpoint
    from gateway.engine.checkpoint.layout import CHECKPOINT_FILES

    assert isinstance(engine, Engine)
    assert (engine.name, engine.model_id, engine.sample_rate) == ("reference", "dummy-seed0", 24000)
    path = dummy_checkpoint_path(engine.settings)
    assert all((path / name).is_file() for name in CHECKPOINT_FILES)
    stamp = (path / "t3_cfg.safetensors").stat().st_mtime_ns
    for _ in quiet_attempts():  # "reused" is also fast: wall time, so a stalled host measures again
        started = time.monotonic()
        assert materialize_dummy_checkpoint(engine.settings) == path  # reused, not rewritten
        took = time.monotonic() - started
    assert took < 1 and (path / "t3_cfg.safetensors").stat().st_mtime_ns == stamp, took
    components = engine.components
    assert components.builtin_conditionals is not None and components.t3.hp.text_tokens_dict_size == 704


def test_decode_loop_samples_what_upstream_samples(engine: ReferenceEngine) -> None:
    """Our stoppable loop against upstream T3.inference: same RNG state, same tokens."""
    from gateway.engine.checkpoint.components import request_t3_cond, text_token_ids
    from gateway.engine.reference.t3_decode import Sampling, generate_speech_tokens

    components = engine.components
    conds = engine.builtin_conditionals()
    text = text_token_ids(components.tokenizer, components.t3, "Parity with upstream.")
    sampling = Sampling(cfg_weight=0.5, temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        ours = generate_speech_tokens(components.t3, request_t3_cond(conds, 0.7), text, sampling, max_new_tokens=6)
        torch.manual_seed(11)
        upstream = components.t3.inference(
            t3_cond=request_t3_cond(conds, 0.7),
            text_tokens=torch.cat([text, text]),
            max_new_tokens=6,
            temperature=0.8,
            cfg_weight=0.5,
            repetition_penalty=1.3,
            min_p=0.05,
            top_p=0.9,
        )
    assert torch.equal(ours, upstream)


async def test_chunks_in_order_deterministic_and_joined_without_clicks(engine: ReferenceEngine, voice: Voice) -> None:
    job = _job(voice, "Hello there.", "A second sentence.", tokens=5, seed=7)
    first = await _collect(engine, job)
    assert len(first) == 2
    for chunk in first:
        assert chunk.samples.dtype == np.float32 and chunk.samples.ndim == 1
        assert 0 < chunk.speech_tokens <= 5
        assert chunk.samples.size == chunk.speech_tokens * SAMPLES_PER_TOKEN
        assert np.all(np.isfinite(chunk.samples)) and np.abs(chunk.samples).max() <= 1.0
        assert np.abs(chunk.samples).max() > 0
    # Each chunk starts and ends at silence, so the join has no step.
    joined = np.concatenate([c.samples for c in first])
    join = first[0].samples.size
    assert abs(joined[join] - joined[join - 1]) < 1e-4
    assert abs(first[0].samples[0]) < 1e-6 and abs(first[1].samples[-1]) < 1e-6

    # Same seed, same audio (chunk seeds depend on the request seed and chunk index only).
    again = await _collect(engine, _job(voice, "Hello there.", tokens=5, seed=7))
    assert np.array_equal(again[0].samples, first[0].samples)
    other = await _collect(engine, _job(voice, "Hello there.", tokens=5, seed=8))
    assert not np.array_equal(other[0].samples, first[0].samples)


async def test_a_traced_job_marks_its_first_chunks_stages(engine: ReferenceEngine, voice: Voice) -> None:
    from gateway.observability.timeline import Timeline

    trace = Timeline()
    job = SynthesisJob(request_id="traced", chunks=("Hello there.", "Again."), voice=voice,
                       params=GenerationParams(max_speech_tokens=4, seed=1), trace=trace)
    assert len(await _collect(engine, job)) == 2
    stages = [stage for stage, _, _ in trace.rows()]
    assert len(stages) == 4 and stages[1].startswith("reference: t3 made "), stages
    assert [stages[0], *stages[2:]] == ["reference: model lock held", "reference: s3gen done",
                                        "reference: watermarked"], "the first chunk's stages, in order, once"


async def test_exaggeration_and_cfg_are_per_request(engine: ReferenceEngine, voice: Voice) -> None:
    from gateway.engine.checkpoint.components import request_t3_cond

    before = voice.conditionals.t3.emotion_adv.clone()
    t3 = engine.components.t3
    with torch.inference_mode():
        calm = t3.prepare_conditioning(request_t3_cond(voice.conditionals, 0.5))
        wild = t3.prepare_conditioning(request_t3_cond(voice.conditionals, 1.5))
    # Only the emotion row (the last conditioning row) depends on exaggeration.
    assert torch.equal(calm[:, :-1], wild[:, :-1]) and not torch.equal(calm[:, -1], wild[:, -1])

    more = await _collect(engine, _job(voice, "Same text.", tokens=3, seed=3, exaggeration=1.5))
    no_cfg = await _collect(engine, _job(voice, "Same text.", tokens=3, seed=3, cfg_weight=0.0))
    assert len(more) == len(no_cfg) == 1 and no_cfg[0].samples.size == no_cfg[0].speech_tokens * SAMPLES_PER_TOKEN
    # The cached voice is shared by every request: it must come out untouched.
    assert torch.equal(voice.conditionals.t3.emotion_adv, before)
    assert voice.conditionals.t3.cond_prompt_speech_emb is None


async def test_cancelling_the_consumer_stops_decoding_within_steps(engine: ReferenceEngine, voice: Voice) -> None:
    job = _job(voice, "This would take four hundred decode steps.", tokens=400)

    async def consume() -> None:
        async for _ in engine.synthesize(job):
            pass

    start_steps = engine.decode_steps
    task = asyncio.create_task(consume())
    deadline = time.monotonic() + 60
    while engine.decode_steps < start_steps + 2:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.01)
    task.cancel()
    at_cancel = engine.decode_steps
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(engine)
    assert engine.decode_steps - at_cancel <= 2  # the step in flight, at most one more
    assert engine.decode_steps - start_steps < 20


async def test_t3_requests_are_counted_waiting_decoding_and_ended(engine: ReferenceEngine, voice: Voice) -> None:
    """Each chunk's T3 call is a request in ``t3_stats`` (the metrics' ``chatterbox_t3_*``):
    waiting while another job holds the model, decoding from its first step, ended with T3
    (before S3Gen) and on a cancel."""
    before = engine.t3_stats().get("chatterbox", T3Stats())
    first = asyncio.create_task(_collect(engine, _job(voice, "Hold the model.", tokens=40)))
    deadline = time.monotonic() + 60
    while engine.t3_stats().get("chatterbox", T3Stats()).decoding < before.decoding + 1:
        assert time.monotonic() < deadline and not first.done()
        await asyncio.sleep(0.01)
    second = asyncio.create_task(_collect(engine, _job(voice, "Wait for it.", "Then more.", tokens=2)))
    while engine.t3_stats()["chatterbox"].waiting < before.waiting + 1:  # behind the model lock
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    busy = engine.t3_stats()["chatterbox"]
    assert (busy.decoding, busy.waiting) == (before.decoding + 1, before.waiting + 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    chunks = await second
    await _wait_idle(engine)
    after = engine.t3_stats()["chatterbox"]
    assert (after.waiting, after.decoding) == (before.waiting, before.decoding) == (0, 0)
    assert after.requests == before.requests + 3  # one per chunk: the cancelled one and two
    made = after.tokens - before.tokens
    assert made >= sum(c.speech_tokens for c in chunks) + 1 and after.deliveries - before.deliveries == made


async def test_closing_between_chunks_runs_nothing_more(engine: ReferenceEngine, voice: Voice) -> None:
    stream = engine.synthesize(_job(voice, "One.", "Two.", "Three.", tokens=3))
    first = await stream.__anext__()
    assert isinstance(first, AudioChunk)
    steps = engine.decode_steps
    await stream.aclose()
    await _wait_idle(engine)
    assert engine.decode_steps == steps


def test_flow_matching_checks_the_stop_event_every_step(engine: ReferenceEngine, voice: Voice) -> None:
    """S3Gen runs as one upstream call; the hook inside it stops the job at the next Euler step."""
    import threading

    from gateway.engine.reference.t3_decode import DecodeCancelled

    components = engine.components
    stop = threading.Event()
    tokens = torch.randint(0, 6561, (10,))
    with engine.holding_model(stop):
        assert engine.busy
        before = engine.flow_steps_run
        components.s3gen.inference(speech_tokens=tokens, ref_dict=voice.conditionals.gen, n_cfm_timesteps=2)
        assert engine.flow_steps_run - before == 2  # one hook call per Euler step
        stop.set()
        before = engine.flow_steps_run
        with pytest.raises(DecodeCancelled):
            components.s3gen.inference(speech_tokens=tokens, ref_dict=voice.conditionals.gen, n_cfm_timesteps=2)
        assert engine.flow_steps_run - before == 1
    assert not engine.busy


def test_voice_conditionals_from_a_clip_round_trip(engine: ReferenceEngine, tmp_path: Path) -> None:
    import soundfile

    from gateway.engine.checkpoint.dummy import synthetic_clip

    clip = tmp_path / "voice.wav"
    soundfile.write(clip, synthetic_clip(seed=5, seconds=3.0, sample_rate=22_050), 22_050)
    conds = engine.compute_conditionals(clip)
    assert conds.t3.speaker_emb.shape == (1, 256)
    assert conds.t3.cond_prompt_speech_tokens.shape[0] == 1
    assert conds.gen["prompt_feat"].shape[-1] == 80
    saved = tmp_path / "voice.pt"
    engine.save_conditionals(conds, saved)
    loaded = engine.load_conditionals(saved)
    assert torch.equal(loaded.t3.speaker_emb, conds.t3.speaker_emb)
    assert torch.equal(loaded.gen["prompt_token"], conds.gen["prompt_token"])
    assert not list(tmp_path.glob(".*tmp"))

    short = tmp_path / "short.wav"
    soundfile.write(short, np.zeros(SAMPLE_RATE // 2, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(InvalidRequestError, match="at least"):
        engine.compute_conditionals(short)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    with pytest.raises(InvalidRequestError):
        engine.compute_conditionals(garbage)


async def test_text_token_counting_and_limits(engine: ReferenceEngine, voice: Voice) -> None:
    assert engine.count_text_tokens("Hello there.") == len(engine.components.tokenizer.encode("Hello there."))
    steps = engine.decode_steps
    with pytest.raises(InvalidRequestError):
        await _collect(engine, _job(voice, "Short.", "x" * 5000))
    assert engine.decode_steps == steps  # refused before any work


async def test_an_engine_that_is_not_started_refuses_work(voice: Voice, tmp_path: Path) -> None:
    idle = ReferenceEngine(Settings(load_format="dummy", cache_dir=str(tmp_path)))
    with pytest.raises(EngineUnavailableError):
        await _collect(idle, _job(voice, "Hello."))
    with pytest.raises(EngineUnavailableError):
        idle.count_text_tokens("Hello.")
