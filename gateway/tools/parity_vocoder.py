"""Parity checks for the batched streaming vocoder: ``python -m gateway.tools.parity_vocoder``.

Random S3Gen weights, synthetic reference clips. Every comparison is an SNR in dB of the
candidate against the reference output (10 log10 sum(ref^2) / sum((cand - ref)^2)); higher
is closer, and bit-identical outputs print as ``inf``.

* upstream: our one-shot path equals upstream ``S3Gen.inference`` when both draw the same
  noise (fp32 only: upstream is the fp32 reference).
* flow batched == alone: rows of different voices, lengths and finalize flags batched with
  padding vs each row alone (mel).
* flow padding does not leak: one row alone at its exact length vs the same row next to a
  much longer row of other tokens, padded to a larger bucket (mel).
* hift batched == alone: rows of one length as one batch vs alone (waveform).
* vocoder streams batched == alone: several streams through the loop at once vs one at a time.
* vocoder streamed == one-shot: streaming windows vs the whole utterance as one window.
* CUDA graphs == eager (CUDA only): the flow through captured encoder and CFM graphs, and
  HiFT through captured graphs with its rows padded to a bucket, vs the same rows eager.
* compiled == plain (``compile``, on CUDA by default): the CFM estimator's blocks through
  ``torch.compile`` (eager, then through its CUDA graphs) vs the plain blocks eager. Held
  to the batching tolerance: compiling reorders arithmetic, it changes no formula.
* stepped CFM graphs == eager (CUDA only): the solve as one graph per Euler step
  (``vocoder_first_window_preempt``'s main loop), with another solver's graphs of the same
  memory pool replayed between every two steps (what a first-window batch does there): the
  solve's state lives outside the pool, so nothing of it is overwritten.
* varlen attention == sdpa (CUDA, bf16/fp16 only): the CFM estimator's attention through
  FlashAttention's variable-length kernel, each row's queries over its real keys
  (``vocoder_attention varlen``), eager and through its CUDA graphs, vs the key-padding bias
  through SDPA: rows of different lengths, so each row's key count is what is checked. The
  batching tolerance.

``--knobs`` measures what the speed knobs do to the audio (not a pass/fail check): each
setting's streamed output against the same streams at upstream's settings, over the first
window and over the whole utterance (``knob_tradeoffs``).

Tolerances. Batching and padding change nothing mathematically (masks are exact), only
which kernels run, so they are held to the dtype's precision: >= 90 dB in fp32 (TF32 is
switched off for the fp32 run; measured 118-124 dB on CPU, while the padding leak this
module's encoder fix removes shows as ~70 dB at tiny sizes and ~40 dB at 25 prompt
tokens), >= 25 dB in bf16/fp16 (8-11 mantissa bits through 6+4 Conformer layers, a
16-block U-Net and n Euler steps of random weights; a leak is structural, not a precision
matter, so the strict fp32 run is the one that proves its absence). Streaming is an approximation by
design (the flow's attention is non-causal, a window sees 3 lookahead tokens, not the
future), so it is held to >= 20 dB in any dtype (measured ~30-35 dB on CPU at tiny sizes,
left context 10-40 tokens; the final window matches one-shot exactly when its left context
reaches the utterance start).

``--bench`` also times flow + HiFT for batches of windows vs the same windows one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gateway.engine.vllm.s3gen_batch import FlowRow, HiftRow, NoiseTapes, S3GenBatch
from gateway.engine.vllm.vocoder import Vocoder
from gateway.engine.vllm.vocoder_windows import WindowPolicy
from gateway.settings import VOCODER_COMPILE_CHOICES, load_settings

REF_SR = 24_000
FP32_SNR_DB = 90.0
LOW_PRECISION_SNR_DB = 25.0
STREAMED_SNR_DB = 20.0


@dataclass(frozen=True, slots=True)
class Sizes:
    prompt_tokens: int
    """Voice A's prompt (25 tokens per second of reference); voice B gets 60% of it."""
    utterances: tuple[int, ...]
    """Speech tokens of each test stream."""
    flow_steps: int
    first_window: int
    window: int
    left_context: int
    max_window: int = 0
    """Later windows grow up to this (0: they stay at ``window``), as in serving."""
    streamed_min_db: float = STREAMED_SNR_DB
    """Streamed vs one-shot must reach this (at serving sizes: issue 10's 30 dB)."""


TINY = Sizes(prompt_tokens=25, utterances=(44, 23, 31), flow_steps=2, first_window=10, window=16, left_context=10,
             max_window=32)
REAL = Sizes(prompt_tokens=250, utterances=(250, 137, 300, 61), flow_steps=10, first_window=20, window=50,
             left_context=25, max_window=200, streamed_min_db=30.0)


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool
    value: float
    """Measured SNR in dB (inf: identical)."""
    tolerance: float
    """Smallest SNR that passes."""
    detail: str = ""


def snr_db(reference: np.ndarray | torch.Tensor, candidate: np.ndarray | torch.Tensor) -> float:
    ref = torch.as_tensor(reference).double().flatten().cpu()
    cand = torch.as_tensor(candidate).double().flatten().cpu()
    if ref.shape != cand.shape:
        return -math.inf
    err = float(((cand - ref) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((ref ** 2).sum()) / err)


def reference_dict(s3gen: Any, prompt_tokens: int, base_hz: float, seed: int) -> dict[str, Any]:
    """A voice's S3Gen ref dict from a synthetic vibrato tone, trimmed to ``prompt_tokens``."""
    seconds = prompt_tokens / 25 + 0.2
    t = np.arange(int(seconds * REF_SR)) / REF_SR
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * (base_hz + 40 * np.sin(2 * np.pi * 0.5 * t)) * t) + 0.02 * rng.standard_normal(t.size)
    ref = s3gen.embed_ref(torch.tensor(wav, dtype=torch.float32), REF_SR)
    n = min(prompt_tokens, ref["prompt_token"].shape[1], ref["prompt_feat"].shape[1] // 2)
    return {"prompt_token": ref["prompt_token"][:, :n], "prompt_token_len": torch.tensor([n]),
            "prompt_feat": ref["prompt_feat"][:, : 2 * n], "prompt_feat_len": None,
            "embedding": ref["embedding"]}


def _tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=gen).tolist()


def _check(name: str, value: float, tolerance: float, detail: str = "") -> CheckResult:
    return CheckResult(name, value >= tolerance, value, tolerance, detail)


def _guarded(name: str, checks: Callable[..., list[CheckResult]], *args: Any) -> list[CheckResult]:
    """``checks(*args)``; one that raises is one failed check named for it, with the error (its
    traceback on stderr), and the checks after it still run: the GPU visit that found the
    stepped graphs raising lost the varlen checks queued behind them."""
    try:
        return checks(*args)
    except Exception as exc:  # noqa: BLE001 - a check's crash is its failure, not the run's end
        traceback.print_exc()
        return [CheckResult(f"{name}: raised", False, float("-inf"), 0.0, f"{type(exc).__name__}: {exc}"[:300])]


def _upstream_check(s3gen: Any, ref: dict[str, Any], tokens: list[int], steps: int, device: str) -> CheckResult:
    """Upstream S3Gen.inference vs our one-shot row, both drawing the same noise."""
    from torch.distributions.uniform import Uniform

    tok = torch.tensor([tokens], device=device)
    ref_dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in ref.items()}
    torch.manual_seed(1234)
    expected, _ = s3gen.inference(tok, ref_dict=dict(ref_dev), n_cfm_timesteps=steps)
    # Replay upstream's draws in its order: CFM randn_like(mu) over prompt+tokens, then
    # SineGen's harmonic phases and its source noise.
    torch.manual_seed(1234)
    frames = 2 * (ref["prompt_token"].shape[1] + len(tokens))
    if getattr(s3gen, "meanflow", False):  # Turbo's flow_inference draws the generated frames' noise first
        generated = torch.randn(1, 80, 2 * len(tokens), device=device)
        flow = torch.randn(1, 80, frames, device=device)
        flow[:, :, frames - generated.shape[2]:] = generated
    else:
        flow = torch.randn(1, 80, frames, device=device)
    phase = Uniform(low=-np.pi, high=np.pi).sample(sample_shape=(1, 9, 1)).to(device)
    phase[:, 0, :] = 0
    noise = torch.randn(1, 9, 2 * len(tokens) * 480, device=device)
    tapes = NoiseTapes(flow[0], phase[0, :, 0], noise[0])
    batch = S3GenBatch(s3gen, device=device, flow_dtype=torch.float32, flow_steps=steps, tapes=tapes)
    voice = batch.prepare_voice(ref)
    mel = batch.run_flow([FlowRow(voice, tokens, 0, len(tokens), True)])[0]
    (wav, _), = batch.run_hift([HiftRow(mel, 0, None, 0)])
    got = wav.cpu().numpy().copy()
    got[: batch.trim_fade.shape[0]] *= batch.trim_fade
    return _check("upstream S3Gen.inference == our one-shot (same noise)", snr_db(expected[0], got), FP32_SNR_DB,
                  f"{len(tokens)} tokens, prompt {ref['prompt_token'].shape[1]}")


async def _stream_chunks(vocoder: Vocoder, jobs: list[tuple[str, dict[str, Any], list[int]]], *,
                         one_shot: bool = False) -> list[list[np.ndarray]]:
    """Open every stream, push all tokens, finish, then collect (all batch together)."""
    streams = []
    for key, ref, tokens in jobs:
        stream = vocoder.open_stream(key, ref, one_shot=one_shot)
        stream.push(tokens)
        stream.finish()
        streams.append(stream)

    async def collect(stream: Any) -> list[np.ndarray]:
        return [a async for a in stream.audio()]

    return list(await asyncio.gather(*(collect(s) for s in streams)))


async def _stream_audio(vocoder: Vocoder, jobs: list[tuple[str, dict[str, Any], list[int]]], *,
                        one_shot: bool = False) -> list[np.ndarray]:
    return [np.concatenate(c) for c in await _stream_chunks(vocoder, jobs, one_shot=one_shot)]


def _watermark_check(device: str, streamed: list[list[np.ndarray]], one_shot: list[np.ndarray],
                     tolerance: float) -> CheckResult | None:
    """Streamed vs one-shot with the Perth watermark as the engine applies it (per stream
    :class:`StreamWatermark`; one pass over a one-shot utterance)."""
    try:
        import perth
    except ImportError:
        return None
    from gateway.engine.base import SAMPLE_RATE
    from gateway.engine.vllm.watermark import StreamWatermark

    wm = perth.PerthImplicitWatermarker(device=device)

    def apply(x: np.ndarray) -> np.ndarray:
        return np.asarray(wm.apply_watermark(x, sample_rate=SAMPLE_RATE), dtype=np.float32)

    values = []
    for chunks, whole in zip(streamed, one_shot):
        marker = StreamWatermark(apply, SAMPLE_RATE)
        parts = [marker.push(c) for c in chunks] + [marker.flush()]
        values.append(snr_db(apply(whole), np.concatenate(parts)))
    return _check("vocoder: streamed == one-shot, watermark on", min(values), tolerance,
                  "per stream " + ", ".join(f"{v:.1f}" for v in values))


def _graph_check(batch: S3GenBatch, rows: list[FlowRow], tol: float) -> list[CheckResult]:
    """CUDA only: the flow through captured encoder and CFM graphs == the same rows eager, and
    HiFT through captured graphs (the rows padded to a bucket of 4) == HiFT eager; replayed
    after PyTorch's cuFFT plan cache was emptied (what a served vocoder's graphs live through
    once other transform shapes have pushed their plans out: a graph that holds one then runs
    on freed memory, hift_decode's docstring)."""
    if batch.device.type != "cuda":
        return []
    from gateway.engine.vllm.cfm_solver import GraphBuckets

    eager = batch.run_flow(rows)
    hift_rows = [HiftRow(m, 17 * i, None, 4) for i, m in enumerate(eager)]
    eager_waves = batch.run_hift(hift_rows)
    seconds = batch.cfm.capture(GraphBuckets.plan(max_rows=4, max_frames=1280))
    pool = batch.cfm.pool
    seconds += batch.capture_encoder(sorted({(r, f // 2) for r, f in batch.cfm.buckets.shapes()}), pool)
    seconds += batch.capture_hift(sorted({(4, r.mel.shape[1]) for r in hift_rows}), pool)
    try:
        torch.backends.cuda.cufft_plan_cache.clear()
        counts = batch.cfm.graph_replays, batch.encoder_graphs.replays, batch.hift_graphs.replays
        graphed = batch.run_flow(rows)
        graphed_waves = batch.run_hift(hift_rows)
        cfm, enc, hift = (after - before for after, before in zip(
            (batch.cfm.graph_replays, batch.encoder_graphs.replays, batch.hift_graphs.replays), counts))
    finally:
        batch.cfm.buckets = None  # later checks run eager
        batch.cfm._graphs.clear()
        batch.encoder_graphs.clear()
        batch.hift_graphs.clear()
    flow = min(snr_db(a, b) for a, b in zip(eager, graphed))
    wave = min(snr_db(a, b) for (a, _), (b, _) in zip(eager_waves, graphed_waves))
    phase = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(eager_waves, graphed_waves))
    return [
        CheckResult("flow: CUDA-graph encoder + CFM == eager", flow >= tol and cfm > 0 and enc > 0, flow, tol,
                    f"{len(rows)} rows, {enc} encoder and {cfm} CFM graph replay(s); captured in {seconds:.1f} s"),
        # HiFT runs in fp32 always, but with TF32 on in a bf16 run: the run's tolerance.
        CheckResult("HiFT: CUDA graphs == eager", wave >= tol and hift > 0 and phase < 1e-3, wave, tol,
                    f"{len(hift_rows)} rows padded to 4, {hift} graph replay(s) after the cuFFT plan cache was"
                    f" emptied; carried phase max diff {phase:.2e}"),
    ]


def _one_width(rows: list[FlowRow]) -> Any:
    """Graph buckets of the rows' widest flow width only (a few graphs, not every width's)."""
    from gateway.engine.vllm.cfm_solver import GraphBuckets

    need = max(2 * (r.voice.prompt_len + len(r.tokens)) for r in rows)
    return GraphBuckets.plan(max_rows=len(rows), min_frames=need, max_frames=need)


def _compile_checks(batch: S3GenBatch, rows: list[FlowRow], tol: float, mode: str) -> list[CheckResult]:
    """The compiled estimator == the plain one: eager, and on CUDA through its captured graphs.
    A compile that fell back to the plain blocks fails the check (its reason in the detail)."""
    from gateway.engine.vllm.meanflow_solver import flow_solver

    plain = batch.run_flow(rows)
    saved = batch.cfm, batch.first_cfm
    solver = flow_solver(saved[0].decoder, steps=saved[0].steps, device=batch.device, dtype=batch.dtype, compile=mode)
    batch.cfm = batch.first_cfm = solver
    results: list[CheckResult] = []

    def add(name: str, got: list[torch.Tensor], detail: str) -> None:
        value = min(snr_db(a, b) for a, b in zip(plain, got))
        failed = solver.compile_error is not None
        results.append(CheckResult(name, value >= tol and not failed, value, tol,
                                   detail + (f"; FELL BACK to the plain blocks: {solver.compile_error}" if failed else "")))

    try:
        t0 = time.perf_counter()
        add(f"flow: compiled CFM ({mode}) == plain", batch.run_flow(rows), f"first call {time.perf_counter() - t0:.1f} s")
        if batch.device.type == "cuda":
            seconds = solver.capture(_one_width(rows))
            add(f"flow: compiled CFM ({mode}) in CUDA graphs == plain eager", batch.run_flow(rows),
                f"{solver.graph_replays} graph replay(s); captured in {seconds:.1f} s")
    finally:
        batch.cfm, batch.first_cfm = saved
    return results


def _stepped_check(batch: S3GenBatch, rows: list[FlowRow], tol: float) -> list[CheckResult]:
    """CUDA only: stepped CFM graphs, another graph of their pool replayed between steps, ==
    the same rows eager."""
    if batch.device.type != "cuda":
        return []
    from gateway.engine.vllm.meanflow_solver import flow_solver

    plain = batch.run_flow(rows)
    saved = batch.cfm, batch.first_cfm
    options = dict(steps=saved[0].steps, device=batch.device, dtype=batch.dtype, attention=saved[0].attention)
    stepped, other = flow_solver(saved[0].decoder, **options), flow_solver(saved[0].decoder, **options)
    buckets = _one_width(rows)
    seconds = stepped.capture(buckets, stepped=True)
    seconds += other.capture(buckets, pool=stepped.pool)
    gen = torch.Generator(device=batch.device).manual_seed(5)
    shape = (len(rows), 80, buckets.frames[0])
    clobber = [torch.randn(shape, device=batch.device, generator=gen, dtype=batch.dtype) for _ in range(3)]
    batch.cfm = batch.first_cfm = stepped
    try:
        steps, between = batch.flow_stepwise(rows), 0
        while True:
            try:
                next(steps)
            except StopIteration as done:
                got = done.value
                break
            other.solve(clobber[0], clobber[1], torch.ones(shape[0], 1, shape[2], device=batch.device,
                                                         dtype=batch.dtype), clobber[2][:, :, 0], clobber[2])
            between += 1
    finally:
        batch.cfm, batch.first_cfm = saved
    value = min(snr_db(a, b) for a, b in zip(plain, got))
    replays = stepped.graph_replays
    return [CheckResult("flow: stepped CFM graphs == eager", value >= tol and replays > 0 and between > 0, value, tol,
                        f"{replays} stepped solve(s), another pool graph replayed {between} time(s) between steps; "
                        f"captured in {seconds:.1f} s")]


def _attention_checks(batch: S3GenBatch, rows: list[FlowRow], tol: float) -> list[CheckResult]:
    """``vocoder_attention varlen`` == ``sdpa`` (where FlashAttention runs: CUDA, bf16/fp16),
    eager and through its CUDA graphs. A solver that fell back to SDPA fails the check."""
    from gateway.engine.vllm.meanflow_solver import flow_solver

    if batch.device.type != "cuda" or batch.dtype not in (torch.float16, torch.bfloat16):
        return []  # nothing to compare: FlashAttention does not run here (a CUDA bf16 run that falls back fails)
    saved = batch.cfm, batch.first_cfm
    solver = flow_solver(saved[0].decoder, steps=saved[0].steps, device=batch.device, dtype=batch.dtype,
                         attention="varlen")
    plain = batch.run_flow(rows)
    batch.cfm = batch.first_cfm = solver
    results: list[CheckResult] = []

    def add(name: str, got: list[torch.Tensor], detail: str) -> None:
        value = min(snr_db(a, b) for a, b in zip(plain, got))
        note = solver.attention_note
        results.append(CheckResult(name, value >= tol and note is None, value, tol,
                                   detail + (f"; FELL BACK to SDPA: {note}" if note else "")))

    try:
        add("flow: varlen attention == sdpa", batch.run_flow(rows), f"{len(rows)} rows of lengths "
            f"{[len(r.tokens) for r in rows]}")
        seconds = solver.capture(_one_width(rows))
        add("flow: varlen attention in CUDA graphs == sdpa eager", batch.run_flow(rows),
            f"{solver.graph_replays} graph replay(s); captured in {seconds:.1f} s")
    finally:
        batch.cfm, batch.first_cfm = saved
    return results


async def _vocoder_checks(s3gen: Any, device: str, dtype: torch.dtype, sizes: Sizes,
                          jobs: list[tuple[str, dict[str, Any], list[int]]], tol: float) -> list[CheckResult]:
    # The production CFM path on CUDA: graphs for a small bucket set (start time), eager beyond.
    settings = load_settings({}, {"flow_steps": sizes.flow_steps, "max_speech_tokens": max(sizes.utterances) + 8,
                                  "vocoder_max_batch": 8, "vocoder_graph_max_frames": 1280})
    # Merge only short tails into the final window, so every stream really is windowed.
    policy = WindowPolicy(first_tokens=sizes.first_window, tokens=sizes.window, left_context=sizes.left_context,
                          final_merge_tokens=sizes.window, max_tokens=sizes.max_window)
    vocoder = Vocoder(s3gen, settings, device=device, flow_dtype=dtype, policy=policy)
    await vocoder.start()
    try:
        alone_chunks = [(await _stream_chunks(vocoder, [job]))[0] for job in jobs]
        alone = [np.concatenate(c) for c in alone_chunks]
        before = vocoder.stats.batches
        together = await _stream_audio(vocoder, jobs)
        batches = vocoder.stats.batches - before
        one_shot = await _stream_audio(vocoder, jobs, one_shot=True)
    finally:
        await vocoder.close()
    batched = min(snr_db(a, b) for a, b in zip(alone, together))
    streamed = [snr_db(o, s) for o, s in zip(one_shot, alone)]
    graphs = vocoder.batch.cfm
    marked = _watermark_check(device, alone_chunks, one_shot, sizes.streamed_min_db)
    return ([marked] if marked is not None else []) + [
        _check("vocoder: concurrent streams == each alone", batched, tol,
               f"{len(jobs)} streams in {batches} batches; min over streams"),
        _check("vocoder: streamed windows == one-shot", min(streamed), sizes.streamed_min_db,
               "per stream " + ", ".join(f"{v:.1f}" for v in streamed)
               + f"; windows {sizes.first_window}/{sizes.window} up to {sizes.max_window or sizes.window},"
               f" left context {sizes.left_context}; CFM graph replays {graphs.graph_replays},"
               f" eager {graphs.eager_runs}"),
    ]


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, sizes: Sizes = TINY, *,
        s3gen: Any = None, seed: int = 0, compile_mode: str | None = None) -> list[CheckResult]:
    """All vocoder parity checks. ``s3gen``: an S3Gen (moved to ``device``; its flow ends up
    cast to ``dtype`` in place); default: a fresh one with random weights from ``seed``.
    ``compile_mode``: also check the compiled estimator (default: ``dynamic`` on CUDA only;
    inductor's CPU compile of the full estimator takes minutes)."""
    if compile_mode is None:
        compile_mode = "dynamic" if str(device).startswith("cuda") else "off"
    if s3gen is None:
        from chatterbox.models.s3gen import S3Gen

        torch.manual_seed(seed)
        s3gen = S3Gen().to(device).eval()
    # fp32 first: embed_ref runs in the flow's dtype, and an earlier bf16 run cast it in place.
    s3gen.to(device=device, dtype=torch.float32)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if dtype == torch.float32:  # true fp32 on CUDA too, so fp32 checks can be strict
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _run(device, dtype, sizes, s3gen, seed, compile_mode)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _run(device: str, dtype: torch.dtype, sizes: Sizes, s3gen: Any, seed: int, compile_mode: str) -> list[CheckResult]:
    gen = torch.Generator().manual_seed(seed + 1)
    ref_a = reference_dict(s3gen, sizes.prompt_tokens, 120.0, seed)
    ref_b = reference_dict(s3gen, max(2, int(sizes.prompt_tokens * 0.6)), 210.0, seed + 1)
    utter = [_tokens(n, gen) for n in sizes.utterances]
    fp32 = dtype == torch.float32
    tol = FP32_SNR_DB if fp32 else LOW_PRECISION_SNR_DB
    results = _Printed()
    if fp32:
        results.append(_upstream_check(s3gen, ref_a, utter[1], sizes.flow_steps, device))

    settings_frames = 2 * (max(sizes.utterances) + 8)
    tapes = NoiseTapes.generate(seed, flow_frames=1000 + settings_frames, hift_samples=settings_frames * 480,
                                harmonics=9, device=device)
    batch = S3GenBatch(s3gen, device=device, flow_dtype=dtype, flow_steps=sizes.flow_steps, tapes=tapes)
    va, vb = batch.prepare_voice(ref_a), batch.prepare_voice(ref_b)
    w, la = sizes.window, 3
    rows = [FlowRow(va, utter[0][: w + la], 0, w, False),
            FlowRow(vb, utter[1], 0, len(utter[1]), True),
            FlowRow(va, utter[0][5: 5 + sizes.left_context + w + la], 5, w, False),
            FlowRow(vb, utter[0][: sizes.first_window + la], 0, sizes.first_window, False)]
    together = batch.run_flow(rows)
    alone = [batch.run_flow([r])[0] for r in rows]
    results.append(_check("flow: batched rows == each alone", min(snr_db(a, b) for a, b in zip(alone, together)),
                          tol, f"{len(rows)} rows, 2 voices, lengths {[len(r.tokens) for r in rows]}"))
    results += _guarded("flow: CUDA graphs", _graph_check, batch, rows, tol)
    results += _guarded("flow: stepped CFM graphs", _stepped_check, batch, rows, tol)
    results += _guarded("flow: varlen attention", _attention_checks, batch, rows, tol)

    probe = rows[3]
    exact = S3GenBatch(s3gen, device=device, flow_dtype=dtype, flow_steps=sizes.flow_steps, tapes=tapes,
                       bucket_tokens=1).run_flow([probe])[0]
    long = 3 * len(utter[0])
    garbage = FlowRow(va, _tokens(long, gen), 0, long - la, False)
    padded = batch.run_flow([probe, garbage], pad_to=long + len(utter[0]) + sizes.prompt_tokens)[0]
    results.append(_check("flow: padding does not leak into shorter rows", snr_db(exact, padded), tol,
                          f"row of {len(probe.tokens)} tokens vs exact length; max abs "
                          f"{(exact - padded).abs().max().item():.2e}"))

    mels = [together[0], together[2], alone[0] * 0.5]
    hrows = [HiftRow(m, 17 * i, None, 4) for i, m in enumerate(mels)]
    wav_b = batch.run_hift(hrows)
    wav_a = [batch.run_hift([r])[0] for r in hrows]
    results.append(_check("hift: batched rows == each alone",
                          min(snr_db(a[0], b[0]) for a, b in zip(wav_a, wav_b)), tol,
                          f"{len(hrows)} rows of {mels[0].shape[1]} frames"))
    fused = S3GenBatch(s3gen, device=device, flow_dtype=dtype, flow_steps=sizes.flow_steps, tapes=tapes,
                       hift_kernels="fused").run_hift(hrows)
    results.append(_check("hift: fused kernels == upstream's modules",
                          min(snr_db(a[0], b[0]) for a, b in zip(wav_b, fused)), tol,
                          "weight norms folded, each Snake one kernel (vocoder_hift_kernels fused)"))

    jobs = [(("A", ref_a), ("B", ref_b))[i % 2] + (u,) for i, u in enumerate(utter)]
    results += asyncio.run(_vocoder_checks(s3gen, device, dtype, sizes, jobs, tol))
    if compile_mode != "off":  # last: the slowest (a compile), and the one most likely to stop
        results += _guarded(f"flow: compiled CFM ({compile_mode})", _compile_checks, batch, rows, tol, compile_mode)
    return list(results)


class _Printed(list):
    """Check results, each printed as it is added: a run stopped by a time limit still shows
    what it checked."""

    def append(self, item: CheckResult) -> None:
        print(f"  {'PASS' if item.passed else 'FAIL'} {item.name}: {item.value:.1f} dB (>= {item.tolerance:.0f}); "
              f"{item.detail}", flush=True)
        super().append(item)

    def __iadd__(self, items):  # type: ignore[override]
        for item in items:
            self.append(item)
        return self


def bench(device: str = "cpu", dtype: torch.dtype = torch.float32, sizes: Sizes = TINY,
          batch_sizes: tuple[int, ...] = (1, 2, 4), *, s3gen: Any = None, seed: int = 0,
          repeats: int = 2) -> list[tuple[int, float, float]]:
    """(rows, batched seconds, one-by-one seconds) for regular windows (flow + HiFT)."""
    if s3gen is None:
        from chatterbox.models.s3gen import S3Gen

        torch.manual_seed(seed)
        s3gen = S3Gen().to(device).eval()
    s3gen.to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    ref = reference_dict(s3gen, sizes.prompt_tokens, 120.0, seed)
    frames = 2 * (sizes.left_context + 2 * sizes.window)
    tapes = NoiseTapes.generate(seed, flow_frames=1000 + frames, hift_samples=frames * 480, harmonics=9, device=device)
    batch = S3GenBatch(s3gen, device=device, flow_dtype=dtype, flow_steps=sizes.flow_steps, tapes=tapes)
    voice = batch.prepare_voice(ref)
    n = sizes.left_context + sizes.window + 3

    def work(rows: list[FlowRow]) -> None:
        mels = batch.run_flow(rows)
        batch.run_hift([HiftRow(m, 0, None, 8) for m in mels])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    work([FlowRow(voice, _tokens(n, gen), sizes.left_context, sizes.window, False)])  # warm-up
    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    out = []
    for b in batch_sizes:
        rows = [FlowRow(voice, _tokens(n, gen), sizes.left_context, sizes.window, False) for _ in range(b)]
        batched, one_by_one = math.inf, math.inf
        for _ in range(repeats):  # interleaved, best of: robust to a shared machine's noise
            batched = min(batched, timed(lambda: work(rows)))
            one_by_one = min(one_by_one, timed(lambda: [work([r]) for r in rows]))
        out.append((b, batched, one_by_one))
    return out


KNOBS = (("vocoder_first_window_flow_steps", 6), ("vocoder_first_window_flow_steps", 4),
         ("vocoder_first_window_flow_steps", 2), ("vocoder_prompt_tokens", 150), ("vocoder_prompt_tokens", 100),
         ("vocoder_prompt_tokens", 50))


async def _streamed(s3gen: Any, device: str, dtype: torch.dtype, sizes: Sizes, jobs: list, **knob: int) -> list[np.ndarray]:
    settings = load_settings({}, {"flow_steps": sizes.flow_steps, "max_speech_tokens": max(sizes.utterances) + 8,
                                  "vocoder_cuda_graphs": False, **knob})
    policy = WindowPolicy(first_tokens=sizes.first_window, tokens=sizes.window, left_context=sizes.left_context,
                          final_merge_tokens=sizes.window, max_tokens=sizes.max_window)
    vocoder = Vocoder(s3gen, settings, device=device, flow_dtype=dtype, policy=policy)
    await vocoder.start()
    try:
        return await _stream_audio(vocoder, jobs)
    finally:
        await vocoder.close()


def knob_tradeoffs(device: str = "cpu", dtype: torch.dtype = torch.float32, sizes: Sizes = TINY, *,
                   s3gen: Any = None, seed: int = 0, knobs: tuple[tuple[str, int], ...] = KNOBS) -> list[dict]:
    """What each speed knob does to the audio: streams at the knob's setting against the same
    streams at upstream's (SNR dB, min over streams), over the first window's samples and the
    whole utterance. Not a pass/fail check: the numbers docs/operations.md quotes."""
    if s3gen is None:
        from chatterbox.models.s3gen import S3Gen

        torch.manual_seed(seed)
        s3gen = S3Gen().to(device).eval()
    s3gen.to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    refs = [reference_dict(s3gen, sizes.prompt_tokens, 120.0, seed), reference_dict(s3gen, sizes.prompt_tokens, 210.0,
                                                                                     seed + 1)]
    jobs = [(f"V{i % 2}", refs[i % 2], _tokens(n, gen)) for i, n in enumerate(sizes.utterances)]
    base = asyncio.run(_streamed(s3gen, device, dtype, sizes, jobs))
    first = sizes.first_window * 2 * 480 - 8 * 480  # the first window's samples, less those held for the seam
    rows = []
    for name, value in knobs:
        if name == "vocoder_prompt_tokens" and value >= sizes.prompt_tokens:
            continue
        got = asyncio.run(_streamed(s3gen, device, dtype, sizes, jobs, **{name: value}))
        rows.append({"knob": f"{name}={value}", "flow_steps": sizes.flow_steps, "prompt_tokens": sizes.prompt_tokens,
                     "first_window_snr_db": round(min(snr_db(b[:first], g[:first]) for b, g in zip(base, got)), 1),
                     "utterance_snr_db": round(min(snr_db(b, g) for b, g in zip(base, got)), 1)})
    return rows


def run_checks(device: str | None = None, dtypes: tuple[torch.dtype, ...] | None = None,
               sizes: Sizes | None = None) -> list[tuple[str, bool, str]]:
    """For the combined ``python -m gateway.tools.parity``: real sizes, fp32 then bf16 on
    CUDA; tiny fp32 on CPU. (name, passed, detail) rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtypes = dtypes or ((torch.float32, torch.bfloat16) if cuda else (torch.float32,))
    sizes = sizes or (REAL if cuda else TINY)
    from chatterbox.models.s3gen import S3Gen

    torch.manual_seed(0)
    s3gen = S3Gen().to(device).eval()
    rows = []
    for dtype in dtypes:  # fp32 first: the flow is cast in place
        for r in run(device, dtype, sizes, s3gen=s3gen):
            rows.append((f"vocoder {str(dtype).removeprefix('torch.')}: {r.name}", r.passed,
                         f"SNR {r.value:.1f} dB (>= {r.tolerance:.0f}); {r.detail}"))
    return rows


def print_table(results: list[CheckResult]) -> None:
    print(f"{'check':58} {'SNR dB':>8} {'min':>5}  result  detail")
    for r in results:
        print(f"{r.name:58} {r.value:8.1f} {r.tolerance:5.0f}  {'PASS' if r.passed else 'FAIL':6}  {r.detail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.parity_vocoder", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--sizes", choices=("tiny", "real"), default=None, help="default: real on CUDA, tiny on CPU")
    ap.add_argument("--bench", action="store_true", help="also time batched vs one-by-one windows")
    ap.add_argument("--compile", choices=VOCODER_COMPILE_CHOICES, default=None,
                    help="also check the compiled estimator (default: dynamic on CUDA, off on the CPU)")
    ap.add_argument("--knobs", action="store_true", help="then measure what the speed knobs do to the audio")
    ap.add_argument("--json", default=None, help="also write the checks (and knob rows) here")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sizes = {"tiny": TINY, "real": REAL, None: REAL if args.device.startswith("cuda") else TINY}[args.sizes]
    from chatterbox.models.s3gen import S3Gen

    torch.manual_seed(0)
    s3gen = S3Gen().to(args.device).eval()
    results = run(args.device, dtype, sizes, s3gen=s3gen, compile_mode=args.compile)
    print_table(results)
    ok = all(r.passed for r in results)
    print("VOCODER PARITY", "PASS" if ok else "FAIL", flush=True)
    knobs: list[dict] = []
    if args.knobs:
        knobs = knob_tradeoffs(args.device, dtype, sizes, s3gen=s3gen)
        print(f"\n{'knob':42} {'first window SNR dB':>20} {'utterance SNR dB':>17}")
        for row in knobs:
            print(f"{row['knob']:42} {row['first_window_snr_db']:20.1f} {row['utterance_snr_db']:17.1f}")
    if args.json:
        import json

        checks = [{"name": r.name, "passed": r.passed, "snr_db": r.value, "min_db": r.tolerance, "detail": r.detail}
                  for r in results]
        with open(args.json, "w") as out:
            json.dump({"device": args.device, "dtype": args.dtype, "checks": checks, "knobs": knobs}, out, indent=1,
                      default=str)
    if args.bench:
        sizes_b = tuple(int(x) for x in args.batch_sizes.split(","))
        print(f"\n{'rows':>5} {'batched s':>10} {'one-by-one s':>13} {'speedup':>8}")
        for b, tb, ts in bench(args.device, dtype, sizes, sizes_b, s3gen=s3gen):
            print(f"{b:5d} {tb:10.3f} {ts:13.3f} {ts / tb:8.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
