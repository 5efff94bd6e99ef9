"""The Perth watermark per window, upstream's call per row against the batched pass the vLLM
engine serves (``python -m gateway.tools.benchmark --stages watermark``).

For each batch size: ``rows`` windows of ``window_s`` seconds of speech-like audio (a regular
streaming window is 78 tokens, 3.12 s, with the watermark's 0.2 s of context: ~3.3 s),
watermarked (a) one ``apply_watermark`` call after another, as the engine ran it until
2026-12-04, and (b) in one :func:`~gateway.engine.vllm.watermark_batch.mark_batch` pass with
the batcher's resampling threads; median ms of ``repeats`` runs after a warm-up, and the
audio-seconds per second each sustains. Perth on CUDA when there is a GPU (as served),
else on the CPU; the rows say which, and check that both give the same audio.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from gateway.engine.base import SAMPLE_RATE
from gateway.engine.vllm.watermark_batch import RESAMPLE_THREADS, mark_batch


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = np.cumsum(2 * np.pi * (rng.uniform(90, 220) + 30 * np.sin(2 * np.pi * 0.7 * t)) / SAMPLE_RATE)
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.1 * t)) ** 2
    return (0.3 * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def stage_watermark(batches: list[int], window_s: float = 3.3, repeats: int = 3) -> list[dict[str, Any]]:
    import torch

    from gateway.engine.checkpoint.components import load_watermarker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    marker = load_watermarker(device)  # as the engines load it
    rows = []
    with ThreadPoolExecutor(RESAMPLE_THREADS, thread_name_prefix="watermark-resample") as pool:
        for b in batches:
            windows = [_speechlike(window_s, seed) for seed in range(b)]

            def per_row() -> list[np.ndarray]:
                return [np.asarray(marker.apply_watermark(w, sample_rate=SAMPLE_RATE), np.float32) for w in windows]

            def batched() -> list[np.ndarray]:
                return mark_batch(marker, windows, SAMPLE_RATE, pool)

            times: dict[str, list[float]] = {"per row": [], "batched": []}
            outputs: dict[str, list[np.ndarray]] = {}
            for rep in range(repeats + 1):  # the first run warms up
                for name, run in (("per row", per_row), ("batched", batched)):
                    t0 = time.perf_counter()
                    outputs[name] = run()
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            worst = min(_snr(a, b_) for a, b_ in zip(outputs["batched"], outputs["per row"]))
            ms = {name: statistics.median(v) * 1000 for name, v in times.items()}
            audio_s = b * window_s
            row = {"stage": "watermark", "device": device, "rows": b, "window s": window_s,
                   "per row ms": round(ms["per row"], 1), "batched ms": round(ms["batched"], 1),
                   "speed-up": round(ms["per row"] / ms["batched"], 2),
                   "per row audio-s/s": round(audio_s / ms["per row"] * 1000, 1),
                   "batched audio-s/s": round(audio_s / ms["batched"] * 1000, 1),
                   # identical rows have no noise to measure: "exact", not Infinity (not JSON)
                   "batched vs per row SNR dB (worst row)": round(worst, 1) if np.isfinite(worst) else "exact"}
            print(row, flush=True)
            rows.append(row)
    return rows


def _snr(a: np.ndarray, ref: np.ndarray) -> float:
    noise = float(((a - ref) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(float((ref ** 2).sum()) / noise))
