"""The vocoder alone, per part and per batch (``python -m gateway.tools.benchmark --stages profile``).

Random S3Gen weights, bf16 flow on CUDA (fp32 on the CPU), a 250-token voice prompt, the CFM
solve through CUDA graphs when there is a GPU. For each configuration, each window kind
(first: 20 + 3 tokens; regular: 25 + 50 + 3; one-shot 10 s: 250) and each batch size:

* **parts** (ms, median of ``repeats`` after a warm-up): flow encoder, CFM inputs, CFM decoder,
  HiFT, host copy, each between device synchronisations (so each is its own kernels' time),
  and the Perth watermark of the batch's rows twice: per row (serial, upstream's call, as the
  engine ran it until 2026-12-04) and batched (``watermark_batch.mark_batch``, as it runs it
  now; not in ``total``, which keeps one watermark as before), and batched with its resampling
  on the device (``watermark_resample = "device"``). The audio-s/s ceiling of the
  vocoder alone follows (watermark excluded).
* **pipelined** (ms per batch, GPU busy share): ``pipeline_batches`` batches back to back as
  the serving loop runs them: launched without synchronisation, at most ``depth`` in flight,
  the busy share from CUDA events (device time of each batch over the wall time).

``model`` ``chatterbox-turbo`` profiles Turbo's vocoder instead: ``S3Gen(meanflow=True)``, its
mean-flow solve (2 steps, no CFG; ``flow_steps`` as given), no fewer-steps knob (it has two).

Configurations (``configs``): ``before`` = graphs, estimator not compiled, one batch in flight
(the code as it served until issue 18, less its host syncs); ``after`` = graphs, estimator
compiled (``compile`` mode), two batches in flight. With ``knobs``, the ``after`` configuration
also times the speed knobs: first windows solved in fewer steps, and windows over a shorter
voice prompt (their effect on the audio: ``python -m gateway.tools.parity_vocoder --knobs``).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gateway.engine.vllm.watermark_batch import RESAMPLE_THREADS, mark_batch

WINDOWS = (  # (name, left context, new tokens, final, carried mel frames)
    ("first window", 0, 20, False, 0),
    ("regular window", 25, 50, False, 8),
    ("one-shot 10 s", 0, 250, True, 0),
)
TINY_WINDOWS = (("first window", 0, 4, False, 0), ("regular window", 2, 6, False, 2), ("one-shot", 0, 8, True, 0))
"""For a dry run of the stage on a CPU: the same code, windows of a few tokens."""


PROFILED_MODELS = ("chatterbox", "chatterbox-turbo")
"""Whose vocoder the stage profiles (Multilingual's is the original's)."""


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    compile: str
    depth: int
    hift_kernels: str = "upstream"


def configs(names: Sequence[str], compile_mode: str) -> list[Config]:
    table = {"before": Config("before", "off", 1), "after": Config("after", compile_mode, 2),
             "hift-fused": Config("hift-fused", "off", 1, hift_kernels="fused")}
    return [table[n] for n in names]


def stage_profile(batches: list[int], flow_steps: int, repeats: int, *, config_names: Sequence[str] = ("before", "after"),
                  compile_mode: str = "dynamic", prompt_tokens: int = 250, knobs: bool = True,
                  pipeline_batches: int = 4, graph_max_frames: int = 1024, one_shot_batches: Sequence[int] = (1, 32),
                  knob_batches: Sequence[int] = (1, 32), watermark: bool = True,
                  on_row: Callable[[dict], None] | None = None, tiny: bool = False,
                  model: str = "chatterbox") -> list[dict]:
    """The profile's rows (see the module docstring); first and regular windows at
    ``batches``, one-shot utterances at ``one_shot_batches``, knobs at ``knob_batches``;
    ``on_row`` sees each row as soon as it is measured."""
    import torch
    from chatterbox.models.s3gen import S3Gen

    from gateway.engine.vllm.s3gen_batch import NoiseTapes
    from gateway.tools.parity_vocoder import reference_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if model not in PROFILED_MODELS:
        raise ValueError(f"the profile stage knows {', '.join(PROFILED_MODELS)}, not {model!r}")
    meanflow = model == "chatterbox-turbo"
    s3gen = S3Gen(meanflow=meanflow).to(device).eval()
    ref = reference_dict(s3gen, prompt_tokens, 120.0, 0)
    tapes = NoiseTapes.generate(0, flow_frames=2 * (prompt_tokens + 600), hift_samples=600 * 2 * 480,
                                harmonics=s3gen.mel2wav.m_source.l_sin_gen.harmonic_num + 1, device=device)
    marker = _watermarker(device) if watermark else None
    windows = TINY_WINDOWS if tiny else WINDOWS
    plan = [(w, batches) for w in windows[:2]] + [(windows[2], list(one_shot_batches))]
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)
        if on_row is not None:
            on_row(row)

    for config in configs(config_names, compile_mode):
        batch, info = _build(s3gen, config, device, dtype, flow_steps, tapes, max(batches), graph_max_frames)
        print(f"profile {config.name}: {info}", flush=True)
        voice = batch.prepare_voice(ref)
        for window, sizes in plan:
            for b in sizes:
                row = _profile_rows(batch, voice, window, b, repeats, marker, pipeline_batches, config.depth)
                row.update({"model": model, "flow_steps": flow_steps, "config": config.name,
                            "compile": batch.cfm.compile, **info})
                add(row)
        if knobs and config.name == "after":
            _knob_rows(s3gen, batch, ref, list(knob_batches), repeats, pipeline_batches, config, dtype,
                       flow_steps, tapes, graph_max_frames, add, windows, fewer_steps=not meanflow)
        del batch
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


@functools.cache
def _resample_pool() -> ThreadPoolExecutor:
    """The batched watermark's resampling threads, as the server's batcher has them."""
    return ThreadPoolExecutor(RESAMPLE_THREADS, thread_name_prefix="watermark-resample")


def _watermarker(device: str) -> Any:
    try:
        from gateway.engine.checkpoint.components import load_watermarker

        return load_watermarker(device)  # as the engines load it
    except Exception as exc:  # noqa: BLE001 - the rest of the profile is still worth printing
        print(f"profile: no watermarker ({exc!r})", flush=True)
        return None


def _build(s3gen: Any, config: Config, device: str, dtype: Any, flow_steps: int, tapes: Any, max_rows: int,
           max_frames: int, first_window_steps: int = 0) -> tuple[Any, dict]:
    """An S3GenBatch for ``config``, its CFM graphs captured on CUDA (compile, if any, happens
    in the first capture's warm-up: its time is part of ``capture_s``). With
    ``first_window_steps`` only the first-window solver's graphs are captured (a knob row
    times first windows only)."""
    import torch

    from gateway.engine.vllm.s3gen_batch import S3GenBatch
    from gateway.engine.vllm.vocoder import cfm_buckets, served_policy
    from gateway.settings import load_settings

    batch = S3GenBatch(s3gen, device=device, flow_dtype=dtype, flow_steps=flow_steps, tapes=tapes,
                       compile=config.compile, first_window_steps=first_window_steps,
                       hift_kernels=config.hift_kernels)
    info: dict[str, Any] = {}
    if device == "cuda":
        t0 = time.perf_counter()
        solver = batch.first_cfm if first_window_steps else batch.cfm
        # the served widths: the geometric ladder plus the default window schedule's (vocoder.cfm_buckets)
        settings = load_settings({}, {})
        solver.capture(cfm_buckets(served_policy(settings), settings, max_rows=max_rows, max_cells=1 << 30,
                                   max_frames=min(max_frames, 640) if first_window_steps else max_frames))
        info = {"graphs": len(solver._graphs), "capture_s": round(time.perf_counter() - t0, 1),
                "graph_mib": round(solver.graph_bytes / 2**20)}
        torch.cuda.synchronize()
    if batch.cfm.compile_error:
        info["compile_error"] = batch.cfm.compile_error
    return batch, info


def _rows_for(batch: Any, voice: Any, window: tuple, b: int, gen: Any, first: bool = True) -> tuple[list, list]:
    import torch

    from gateway.engine.vllm.s3gen_batch import FlowRow

    name, context, new, final, carried = window
    n_in = context + new + (0 if final else batch.lookahead)
    flow_rows = [FlowRow(voice, torch.randint(0, 6561, (n_in,), generator=gen).tolist(), 0, new, final,
                         first=first and name == "first window") for _ in range(b)]
    return flow_rows, [carried, final]


def _hift_rows(mels: list, carried: int, final: bool) -> list:
    import torch

    from gateway.engine.vllm.s3gen_batch import HiftRow

    return [HiftRow(torch.cat([m[:, :carried], m], dim=1) if carried else m, 0, None, 0 if final else 8) for m in mels]


def _profile_rows(batch: Any, voice: Any, window: tuple, b: int, repeats: int, marker: Any,
                  pipeline_batches: int, depth: int) -> dict:
    import torch

    from gateway.engine.base import SAMPLE_RATE
    from gateway.engine.vllm.s3gen_batch import StageTimer

    gen = torch.Generator().manual_seed(b)
    flow_rows, (carried, final) = _rows_for(batch, voice, window, b, gen)
    timer = StageTimer(batch.device)
    samples: dict[str, list[float]] = {}
    for rep in range(repeats + 1):  # the first run warms up (cuDNN autotune, allocator)
        batch.timer = timer
        timer.reset()
        t0 = time.perf_counter()
        mels = batch.run_flow(flow_rows)
        waves = batch.run_hift(_hift_rows(mels, carried, final))
        with timer.section("host copy"):
            host = [w.cpu().numpy() for w, _ in waves]
        if marker is not None:  # upstream's call per row, as the tables before 2026-12-04 timed it
            with timer.section("watermark (per row, serial)"):
                for audio in host:
                    marker.apply_watermark(audio, sample_rate=SAMPLE_RATE)
        total = time.perf_counter() - t0  # one watermark in it, as before: totals stay comparable
        if marker is not None:  # the served batched pass, timed beside it, outside the total
            with timer.section("watermark (batched)"):
                mark_batch(marker, host, SAMPLE_RATE, _resample_pool())
            with timer.section("watermark (batched, device resampling)"):  # watermark_resample device
                mark_batch(marker, host, SAMPLE_RATE, resample="device")
        batch.timer = None
        if rep:
            for part, sec in timer.seconds.items():
                samples.setdefault(part, []).append(sec)
            samples.setdefault("total", []).append(total)
    med = {part: statistics.median(v) * 1000 for part, v in samples.items()}
    name, _, new, _, _ = window
    audio_s = b * new / 25
    vocoder_ms = med["total"] - med.get("watermark (per row, serial)", 0.0)
    row = {"stage": "profile", "window": f"{name} ({len(flow_rows[0].tokens)} + {voice.prompt_len} prompt tokens)",
           "batch": b, **{f"{k} ms": round(v, 1) for k, v in med.items()},
           "vocoder audio-s/s (no watermark)": round(audio_s / (vocoder_ms / 1000), 1)}
    per_batch, busy = pipelined(batch, flow_rows, carried, final, pipeline_batches, depth)
    row.update({"pipeline depth": depth, "pipelined ms/batch": round(per_batch * 1000, 1),
                "gpu busy share": round(busy, 3),
                "pipelined audio-s/s": round(audio_s / per_batch, 1)})
    return row


def pipelined(batch: Any, flow_rows: list, carried: int, final: bool, n: int, depth: int) -> tuple[float, float]:
    """(seconds per batch, device busy share) of ``n`` batches run as the serving loop runs
    them: launched without waiting, at most ``depth`` in flight."""
    from gateway.engine.vllm.s3gen_batch import BatchClock, HostCopy

    in_flight: deque = deque()
    busy = 0.0

    def finish() -> float:
        copy, clock = in_flight.popleft()
        copy.wait()
        return clock.busy_s()

    t0 = time.perf_counter()
    for _ in range(n):
        clock = BatchClock(batch.device)
        mels = batch.run_flow(flow_rows, clock=clock)
        waves = batch.run_hift(_hift_rows(mels, carried, final), clock=clock)
        in_flight.append((HostCopy([w for w, _ in waves], clock), clock))
        if len(in_flight) >= depth:
            busy += finish()
    while in_flight:
        busy += finish()
    wall = time.perf_counter() - t0
    return wall / n, busy / wall


def _knob_rows(s3gen: Any, batch: Any, ref: dict, batches: list[int], repeats: int, pipeline_batches: int,
               config: Config, dtype: Any, flow_steps: int, tapes: Any, max_frames: int,
               add: Callable[[dict], None], windows: Sequence[tuple] = WINDOWS, fewer_steps: bool = True) -> None:
    """The speed knobs on the ``after`` configuration: shorter voice prompts (same graphs,
    narrower rows), and (``fewer_steps``) first windows in fewer steps (their own solver and graphs)."""
    import torch

    for prompt in (150, 100):
        batch.prompt_tokens = prompt
        voice = batch.prepare_voice(ref)
        batch.prompt_tokens = 0
        for window in windows[:2]:
            for b in batches:
                row = _profile_rows(batch, voice, window, b, repeats, None, pipeline_batches, config.depth)
                row.update({"config": f"after, vocoder_prompt_tokens={prompt}", "compile": batch.cfm.compile})
                add(row)
    for steps in (4,) if fewer_steps else ():
        knob, info = _build(s3gen, config, str(batch.device), dtype, flow_steps, tapes, max(batches), max_frames,
                            first_window_steps=steps)
        voice = knob.prepare_voice(ref)
        for b in batches:
            row = _profile_rows(knob, voice, windows[0], b, repeats, None, pipeline_batches, config.depth)
            row.update({"config": f"after, vocoder_first_window_flow_steps={steps}", "compile": knob.cfm.compile,
                        **info})
            add(row)
        del knob
        if batch.device.type == "cuda":
            torch.cuda.empty_cache()
