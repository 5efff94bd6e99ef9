"""What the streaming window schedule costs the vocoder once T3 has run ahead of it.

Under load T3 finishes an utterance long before the vocoder has caught up with it (at 128
streams on an H200 T3 makes ~8x real time, the vocoder ~0.4x): a stream's every window after
the first is planned with all its tokens there. Every window re-runs the flow over the voice
prompt (~500 of a regular window's ~700 mel frames), so how the rest of an utterance is cut
decides how much flow work its audio costs. ``stream_final_window_tokens`` is that cut: once
T3 has finished, what is left goes as one final window when at most that many tokens remain.

For each value of it (``--final``; 0 is the default, twice ``stream_max_window_tokens``; 100
is the rule until 2026-12-05, when a first window also never took more than twice its size),
``--streams`` streams open at once on the served :class:`~gateway.engine.vllm.vocoder.Vocoder`
(random S3Gen weights; on CUDA in bf16 with its CUDA graphs, on the CPU in fp32, eager), each
with its first window planned ``early`` (its tokens there, T3 still running: the rest comes
when its first audio does) and ``late`` (the whole utterance there: a vocoder behind), plus
one-shot vocoding (the floor: one window an utterance). A row gives the windows, flow mel
frames solved per audio-second (voice prompt included), the vocoder's wall seconds per
audio-second (the streams batched together; the inverse is its ceiling in audio-s per s),
and the audio's SNR against one-shot vocoding of the same tokens (min over streams: what the
cut costs in fidelity; streamed audio departs from one-shot at every seam).

With ``--arrivals mixed`` (every other stream early) the first batch holds small first windows
beside whole utterances: ``--setting vocoder_split_min_rows=0`` against the default shows what
solving such a batch by width saves.

``python -m gateway.tools.bench_windows --final 100,0 --streams 4 --tokens 250``
(on a 2-core CPU add ``--flow-steps 2 --streams 2``: ~4 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gateway.engine.base import SAMPLE_RATE
from gateway.engine.vllm.vocoder import Vocoder, served_policy, with_own_flow
from gateway.engine.vllm.vocoder_windows import TOKEN_MEL_RATIO, WindowPolicy, next_window
from gateway.settings import Settings, load_settings
from gateway.tools.bench_engine_host import setting_arg
from gateway.tools.bench_host import print_rows, write_result
from gateway.tools.parity_vocoder import reference_dict, snr_db


ARRIVALS = ("early", "late")
"""When a stream's first window is planned: ``early``, with its first window's tokens there
and T3 still running (a vocoder keeping up: the rest arrives while the first window is
vocoded); ``late``, after T3 finished the utterance (a vocoder behind: under load). Also
``mixed`` (not run unless asked): every other stream early, so the first batch holds small
first windows beside whole utterances (``vocoder_split_min_rows`` splits such a solve)."""
CHOICES = (*ARRIVALS, "mixed")


def arrival_of(arrival: str, stream: int) -> str:
    """Stream ``stream``'s own arrival under ``arrival`` (``mixed``: even streams early)."""
    return ("early" if stream % 2 == 0 else "late") if arrival == "mixed" else arrival


def plan(policy: WindowPolicy, tokens: int, arrival: str = "late") -> list[Any]:
    """The windows of a ``tokens``-token utterance: every window after the first is planned
    with all tokens there (T3 ran ahead); the first one as ``arrival`` says."""
    windows: list[Any] = []
    committed = 0
    while committed < tokens:
        early = arrival == "early" and not windows
        available = min(tokens, policy.first_tokens + policy.lookahead) if early else tokens
        window = next_window(policy, available=available, committed=committed,
                             finished=available == tokens, index=len(windows))
        assert window is not None  # a stream with its window's tokens there always has one
        windows.append(window)
        committed = window.end
    return windows


def policy_for(settings: Settings, final_tokens: int) -> WindowPolicy:
    """The served window policy (as :class:`Vocoder` builds it) with ``final_tokens``."""
    return dataclasses.replace(served_policy(settings), final_merge_tokens=final_tokens)


async def _vocode(vocoder: Vocoder, jobs: list[tuple[str, dict[str, Any], list[int]]], *, one_shot: bool = False,
                  arrival: str = "late") -> tuple[list[np.ndarray], float, float]:
    """Every job's audio (all streams at once), the wall seconds and the device-busy seconds.
    ``early``: each stream gets its first window's tokens, and the rest (finished) when its
    first audio arrives."""
    busy0 = vocoder.stats.device_busy_s
    first = vocoder.policy.first_tokens + vocoder.policy.lookahead
    t0 = time.perf_counter()

    async def run(index: int, key: str, ref: dict[str, Any], tokens: list[int]) -> np.ndarray:
        stream = vocoder.open_stream(key, ref, one_shot=one_shot)
        held = arrival_of(arrival, index) == "early" and not one_shot and len(tokens) > first
        stream.push(tokens[:first] if held else tokens)
        if not held:
            stream.finish()
        parts = []
        async for samples in stream.audio():
            parts.append(samples)
            if held:
                stream.push(tokens[first:])
                stream.finish()
                held = False
        return np.concatenate(parts)

    audio = list(await asyncio.gather(*(run(i, *job) for i, job in enumerate(jobs))))
    return audio, time.perf_counter() - t0, vocoder.stats.device_busy_s - busy0


async def measure(finals: Sequence[int], streams: int, tokens: int, flow_steps: int, prompt_tokens: int,
                  device: str, seed: int = 0, overrides: dict[str, Any] | None = None,
                  arrivals: Sequence[str] = ARRIVALS) -> list[dict[str, Any]]:
    """The rows (see the module docstring); ``overrides``: other server settings (window sizes)."""
    from chatterbox.models.s3gen import S3Gen

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(seed)
    s3gen = S3Gen().to(device).eval()
    refs = [reference_dict(s3gen, prompt_tokens, 120.0 + 30 * i, seed + i) for i in range(2)]
    gen = torch.Generator().manual_seed(seed + 7)
    jobs = [(f"voice-{i % 2}", refs[i % 2], torch.randint(0, 6561, (tokens,), generator=gen).tolist())
            for i in range(streams)]
    settings = load_settings(environ={}, overrides={
        "flow_steps": flow_steps, "max_speech_tokens": tokens + 8, "vocoder_max_batch": max(streams, 1),
        "vocoder_cuda_graphs": cuda, **(overrides or {})})
    vocoder = Vocoder(with_own_flow(s3gen), settings, device=device, flow_dtype=dtype)
    await vocoder.start()
    rows: list[dict[str, Any]] = []
    try:
        await _vocode(vocoder, jobs[:1], arrival="early")  # warm-up: first-call costs out of the rows
        one_shot, wall, busy = await _vocode(vocoder, jobs, one_shot=True)
        audio_s = sum(a.size for a in one_shot) / SAMPLE_RATE
        rows.append(_row("one-shot", "", 1, streams * TOKEN_MEL_RATIO * (prompt_tokens + tokens), audio_s, wall, busy,
                         None))
        for final in finals:
            policy = policy_for(settings, final)
            vocoder.policy = policy
            for arrival in arrivals:
                plans = [plan(policy, tokens, arrival_of(arrival, i)) for i in range(streams)]
                frames = sum(TOKEN_MEL_RATIO * (prompt_tokens + w.input_tokens) for p in plans for w in p)
                audio, wall, busy = await _vocode(vocoder, jobs, arrival=arrival)
                label = f"final <= {policy.merge_limit}" + (" (default)" if final == 0 else "")
                row = _row(label, arrival, sum(len(p) for p in plans) / streams, frames,
                           sum(a.size for a in audio) / SAMPLE_RATE, wall, busy,
                           min(snr_db(o, a) for o, a in zip(one_shot, audio)))
                row["windows"] = " / ".join(sorted({"+".join(str(w.new_tokens) for w in p) for p in plans}))
                rows.append(row)
    finally:
        await vocoder.close()
    for row in rows:
        row.update({"streams": streams, "tokens": tokens, "flow_steps": flow_steps, "prompt_tokens": prompt_tokens,
                    "device": device, "settings": dict(overrides or {})})
    return rows


def _row(label: str, arrival: str, windows: float, frames: int, audio_s: float, wall: float, busy: float,
         snr: float | None) -> dict[str, Any]:
    return {"schedule": label, "first_window": arrival, "windows_per_utterance": windows,
            "flow_frames_per_audio_s": round(frames / audio_s, 1),
            "vocoder_s_per_audio_s": round(wall / audio_s, 4),
            "audio_s_per_s": round(audio_s / wall, 2),
            "device_busy_s_per_audio_s": round(busy / audio_s, 4) if busy else None,
            # JSON has no infinity: an identical signal is said so instead of an SNR
            "snr_vs_one_shot_db": None if snr is None or math.isinf(snr) else round(snr, 1),
            "identical_to_one_shot": None if snr is None else math.isinf(snr)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.tools.bench_windows", description=__doc__.split("\n\n")[0])
    p.add_argument("--final", default="100,0", help="stream_final_window_tokens values, one row each (0: default)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--arrivals", default=",".join(ARRIVALS), help="first windows planned early, late, mixed (comma-separated)")
    p.add_argument("--tokens", type=int, default=250, help="speech tokens per utterance (250: 10 s)")
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=250, help="the voice prompt (250: 10 s, upstream's most)")
    p.add_argument("--device", default=None, help="default: cuda if there is one")
    p.add_argument("--setting", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a server setting for the vocoder (e.g. stream_max_window_tokens=400); repeatable")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    finals = [int(v) for v in args.final.split(",") if v.strip()]
    arrivals = [a for a in args.arrivals.split(",") if a]
    if not arrivals or set(arrivals) - set(CHOICES):
        p.error(f"--arrivals: some of {', '.join(CHOICES)}")
    rows = asyncio.run(measure(finals, args.streams, args.tokens, args.flow_steps, args.prompt_tokens, device,
                               overrides=dict(args.setting),
                               arrivals=arrivals))
    keys = ["schedule", "first_window", "windows", "windows_per_utterance", "flow_frames_per_audio_s", "vocoder_s_per_audio_s",
            "audio_s_per_s", "device_busy_s_per_audio_s", "snr_vs_one_shot_db", "identical_to_one_shot"]
    print_rows(rows, keys)
    if args.json:
        write_result(args.json, "gateway.tools.bench_windows", argv, device, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
