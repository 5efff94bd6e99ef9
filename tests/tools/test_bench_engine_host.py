"""The engine host benchmark (``gateway.tools.bench_engine_host``): the vLLM engine's own code
with T3's and the vocoder's GPU work stood in for. An utterance comes out whole through the
real windows and seams, and a row's figures follow from the run and the T3 step model."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.engine.base import GenerationParams, SynthesisJob
from gateway.engine.vllm.t3.families import T3Sampling
from gateway.models.families import FAMILIES, TURBO
from gateway.tools import bench_engine_host

SAMPLES_PER_TOKEN = 960


async def test_an_utterance_comes_out_whole_through_the_stand_ins(tmp_path: Path) -> None:
    tokens = 37
    settings = bench_engine_host.engine_settings(TURBO, 2, str(tmp_path))
    real = T3Sampling.to_vllm
    with bench_engine_host.sampling_without_vllm():
        engine = bench_engine_host.build_engine(TURBO, settings, (0.5, 0.0), (1.0, 0.1), tokens, tmp_path)
        await engine.runtimes[TURBO].vocoder.start()
        job = SynthesisJob("u", (bench_engine_host.TEXT,), bench_engine_host.voice_for(TURBO),
                           GenerationParams(max_speech_tokens=tokens), model=TURBO, streaming=True)
        chunks = [chunk async for chunk in engine.synthesize(job)]
        await engine.close()
    audio = np.concatenate([c.samples for c in chunks])
    # T3's tokens and Turbo's silence tail, in several windows joined at their seams
    assert audio.size == (tokens + FAMILIES[TURBO].silence_tail_tokens) * SAMPLES_PER_TOKEN
    assert len(chunks) > 1 and sum(c.speech_tokens for c in chunks) == tokens
    assert engine.runtimes[TURBO].vocoder.stats.batches >= len(chunks)
    assert T3Sampling.to_vllm is real  # the stand-in for vLLM's SamplingParams was this run's only


async def test_a_first_window_lane_stands_in_as_the_main_loop_does(tmp_path: Path) -> None:
    """With ``vocoder_first_window_lane_rows`` the lane is a stand-in too (no S3Gen work on the
    host), with the same cost model and graph widths up to its first-window top, and an
    utterance still comes out whole, its first window through the lane."""
    tokens = 37
    settings = bench_engine_host.engine_settings(TURBO, 2, str(tmp_path), {"vocoder_first_window_lane_rows": 4})
    with bench_engine_host.sampling_without_vllm():
        engine = bench_engine_host.build_engine(TURBO, settings, (0.5, 0.0), (1.0, 0.1), tokens, tmp_path)
        vocoder = engine.runtimes[TURBO].vocoder
        lane = vocoder.first_lane
        assert isinstance(lane, bench_engine_host.DeviceFreeVocoder) and lane.batch_ms == vocoder.batch_ms
        assert max(f for _, f in lane.batch.cfm.buckets.shapes()) <= lane.first_window_top()
        in_lane: list[int] = []
        launch = lane._launch_batch
        lane._launch_batch = lambda jobs, refs: in_lane.extend(j.window.index for j in jobs) or launch(jobs, refs)
        await vocoder.start()
        job = SynthesisJob("u", (bench_engine_host.TEXT,), bench_engine_host.voice_for(TURBO),
                           GenerationParams(max_speech_tokens=tokens), model=TURBO, streaming=True)
        chunks = [chunk async for chunk in engine.synthesize(job)]
        batches = vocoder.stats.batches
        await engine.close()
    audio = np.concatenate([c.samples for c in chunks])
    assert audio.size == (tokens + FAMILIES[TURBO].silence_tail_tokens) * SAMPLES_PER_TOKEN
    assert in_lane == [0] and vocoder.stats.first_window_rows == 1 and batches >= len(chunks)


def test_a_row_is_paced_by_the_t3_step_model(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "rows.json"
    # a step of 10 ms + 1 ms a row: 3 streams get 3 x 1000 / 13 tokens a second, 9.2 audio-s/s,
    # and with Turbo's 3 silence tokens after each 30: 10.2
    assert bench_engine_host.main(["--model", TURBO, "--streams", "1,3", "--seconds", "3", "--tokens", "30",
                                   "--t3-step-ms", "10,1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"card", "date", "command", "rows"} <= set(doc)
    one, three = doc["rows"]
    assert (one["t3_alone_audio_s_per_s"], three["t3_alone_audio_s_per_s"]) == (4.0, 10.2)
    for row in (one, three):
        assert row["errors"] == 0 and row["utterances_done"] >= row["streams"]
        assert 0 < row["steady_audio_s_per_s"] <= 1.1 * row["t3_alone_audio_s_per_s"]
        assert row["vocoder_rows_per_batch"] <= row["streams"] and row["first_audio_p50_ms"] > 0
        # each 30-token utterance's windows carry the 250-token voice prompt: far above one-shot's ~100
        assert row["vocoder_flow_frames_per_audio_s"] > 2 * (250 + 30) / (30 * 0.04)
        assert isinstance(row["vocoder_whole_utterance_windows"], int)
        assert row["watermark_busy_share"] is None and row["watermark_rows_per_pass"] is None  # no watermark here
    assert "| chatterbox-turbo | 3 |" in capsys.readouterr().out


def test_settings_on_the_command_line_are_typed() -> None:
    assert bench_engine_host.setting_arg("vocoder_cuda_graphs=false") == ("vocoder_cuda_graphs", False)
    assert bench_engine_host.setting_arg("vocoder-max-batch=32") == ("vocoder_max_batch", 32)
    assert bench_engine_host.setting_arg("vocoder_compile=dynamic") == ("vocoder_compile", "dynamic")


def test_a_row_can_run_the_served_vocoder_and_watermark(tmp_path: Path) -> None:
    """--vocoder real: S3Gen (random weights) and the batched Perth pass as the engine builds
    them, on the CPU here; the row says which vocoder ran and what the setting changed. The
    flow sees 25 of the voice's prompt tokens (not its 10 s): one window of the whole prompt
    took 19 s on a 2-core AMD EPYC (2026-12-05), longer than the row's window."""
    out = tmp_path / "rows.json"
    assert bench_engine_host.main(["--model", TURBO, "--streams", "1", "--seconds", "8", "--tokens", "8",
                                   "--t3-step-ms", "1,0", "--vocoder", "real", "--device", "cpu", "--watermark",
                                   "--setting", "vocoder_max_batch=2", "--setting", "vocoder_prompt_tokens=25",
                                   "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["vocoder"], row["watermark"], row["errors"]) == ("real (cpu)", True, 0), row["first_error_trace"]
    assert row["utterances_done"] >= 1 and row["steady_audio_s_per_s"] > 0
    assert 0 < row["vocoder_busy_share"] <= 1.0 and row["vocoder_rows_per_batch"] <= 2


def test_a_row_warms_the_engine_up_before_its_window(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """First-call costs (on a GPU machine vLLM's import, seconds of the event loop, the first
    time a request builds its SamplingParams) run before the window, not in its first wave."""
    from gateway.engine.vllm.engine import VllmEngine

    real = VllmEngine.synthesize
    jobs: list[str] = []

    def recording(self, job):  # type: ignore[no-untyped-def]
        jobs.append(job.request_id)
        return real(self, job)

    monkeypatch.setattr(VllmEngine, "synthesize", recording)
    row = asyncio.run(bench_engine_host.measure(TURBO, 2, 1.5, (1.0, 0.0), (0.0, 0.0), tokens=20))
    assert jobs[0] == "warm-up" and jobs.count("warm-up") == 1
    assert row["utterances_done"] >= 2 and row["errors"] == 0


def test_staggered_streams_start_spread_over_the_span(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``--stagger-s``: stream i's first request goes i / streams of the span late, so the
    streams' windows do not all fall due together (all at once, a first window never meets
    another stream's later one: ``vocoder_first_apart`` would show nothing)."""
    import time

    from gateway.engine.vllm.engine import VllmEngine

    real = VllmEngine.synthesize
    started: dict[str, float] = {}

    def recording(self, job):  # type: ignore[no-untyped-def]
        started.setdefault(job.request_id, time.perf_counter())
        return real(self, job)

    monkeypatch.setattr(VllmEngine, "synthesize", recording)
    row = asyncio.run(bench_engine_host.measure(TURBO, 4, 1.5, (1.0, 0.0), (0.0, 0.0), tokens=10, stagger_s=0.8))
    firsts = [started[f"s{i}-0"] for i in range(4)]
    # 0.2 s apart; never early (a stalled host makes one late, and the next one's sleep short)
    assert firsts == sorted(firsts), firsts
    assert all(firsts[i] - firsts[0] >= 0.2 * i - 0.05 for i in range(4)), firsts
    assert firsts[-1] - firsts[0] < 10, firsts
    assert row["stagger_s"] == 0.8 and row["errors"] == 0


def test_the_stand_in_vocoders_cost_grows_with_the_flow_frames_it_stands_for() -> None:
    """``--vocoder-ms A,B,C``: a batch's audio is ready A + B x rows + C x flow frames / 1000
    ms after its launch, the frames each row's flow would solve (voice prompt and window, 2
    a token), so a window schedule's flow work shows in the row's timing."""
    import time
    from types import SimpleNamespace

    from gateway.engine.vllm.vocoder_windows import Window
    from gateway.tools.bench_engine_host import VOICE_PROMPT_TOKENS, DeviceFreeVocoder, _costs

    assert _costs("100,0,34") == (100.0, 0.0, 34.0) and _costs("5") == (5.0, 0.0, 0.0)
    with pytest.raises(argparse.ArgumentTypeError):
        _costs("1,2,3,4")
    vocoder = DeviceFreeVocoder.__new__(DeviceFreeVocoder)
    eager = SimpleNamespace(frames_for=lambda frames: frames)  # no graphs: each row at its own width
    vocoder._ready_at, vocoder._free_at, vocoder.batch_ms = {}, 0.0, (10.0, 5.0, 100.0)
    vocoder.batch = SimpleNamespace(harmonics=9, cfm=eager, prompt_tokens=0)  # 0: the whole prompt
    first = SimpleNamespace(window=Window(0, 0, 0, 20, 23, False), mel_tail=None, carry=0)
    whole = SimpleNamespace(window=Window(0, 0, 0, 250, 250, True), mel_tail=None, carry=0)
    t0 = time.perf_counter()
    launched = vocoder._launch_batch([first, whole], {})
    frames = 2 * (VOICE_PROMPT_TOKENS + 23) + 2 * (VOICE_PROMPT_TOKENS + 250)
    want = (10.0 + 5.0 * 2 + 100.0 * frames / 1000) / 1000
    assert abs(vocoder._ready_at[id(launched)] - t0 - want) < 0.05
    # a batch launched while the last runs starts when it ends (one stream: in order)
    then = vocoder._launch_batch([first, whole], {})
    assert vocoder._ready_at[id(then)] - vocoder._ready_at[id(launched)] == pytest.approx(want)
    # with CUDA graph widths each row costs the width it pads to
    vocoder.batch.cfm = SimpleNamespace(frames_for=lambda frames: -(-frames // 512) * 512)
    vocoder._free_at = 0.0  # the stand-in device idle again
    t0 = time.perf_counter()
    launched = vocoder._launch_batch([first, whole], {})
    want = (10.0 + 5.0 * 2 + 100.0 * (1024 + 1024) / 1000) / 1000
    assert abs(vocoder._ready_at[id(launched)] - t0 - want) < 0.05
    # ``vocoder_prompt_tokens``: each row's flow carries only that much of the voice prompt
    vocoder.batch = SimpleNamespace(harmonics=9, cfm=eager, prompt_tokens=100)
    vocoder._free_at = 0.0
    t0 = time.perf_counter()
    launched = vocoder._launch_batch([first, whole], {})
    want = (10.0 + 5.0 * 2 + 100.0 * (2 * (100 + 23) + 2 * (100 + 250)) / 1000) / 1000
    assert abs(vocoder._ready_at[id(launched)] - t0 - want) < 0.05
    assert {r.prompt_tokens for r in launched.outcomes} == {100}


def test_the_stand_in_refuses_preemption_it_cannot_model() -> None:
    """The stand-in vocoder's batch is one sleep: no CFM steps to stop between."""
    with pytest.raises(SystemExit):
        bench_engine_host.main(["--streams", "1", "--setting", "vocoder_first_window_lane_rows=2",
                                "--setting", "vocoder_first_window_preempt=true"])
