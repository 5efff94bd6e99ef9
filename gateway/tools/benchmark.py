"""Benchmark the fast engine against the reference engine: ``python -m gateway.tools.benchmark``.

Runs on the GPU machine with dummy weights of the real architecture and fixed, bounded
generation lengths (dummy T3 never samples its stop token, so every request makes exactly
``--tokens`` speech tokens). Stages, each guarded so one failure still prints the rest:

* ``t3``: our vLLM T3 model alone (offline ``LLM``, CUDA graphs, CFG on): decode tokens/s at
  1/8/32/128 concurrent requests: the ceiling the whole engine can reach.
* ``engine``: ``VllmEngine`` and ``ReferenceEngine`` through the Engine interface:
  single-stream RTF for a 10 s utterance, time to first audio chunk p50/p95 streaming at
  1/8/32 concurrent, aggregate audio-seconds per second at 1/8/32/128, GPU memory, with the
  watermark on and off; also non-streaming (one-shot vocoding) audio-seconds per second at
  1/8/32/128.
* ``t3step``: T3's time per decode step and what runs outside its CUDA graph
  (``gateway.tools.bench_t3``).
* ``profile``: the batched S3Gen vocoder alone, per part and per batch size, before and
  after issue 18's changes in one run, plus the pipelined loop's GPU busy share and the
  speed knobs (``gateway.tools.bench_profile`` says how each figure is made): what bounds
  time to first audio and throughput.
* ``watermark``: the Perth watermark of ``--watermark-batches`` windows, upstream's call per
  row against the batched pass the engine serves (``gateway.tools.bench_watermark``); runs on
  a CPU as well.
* ``timeline``, ``http``, ``loadtest``: as a client sees it, through one live server
  (``python -m gateway serve --engine vllm``, dummy weights, a subprocess started once for
  all three; ``gateway.tools.bench_server``). ``timeline``: every stage of one request's first
  audio, from the server's log (``gateway.tools.bench_timeline``). ``http``: one row per model
  (``--models``; ``mixed`` = the loaded families in turn) and concurrency: first audio
  p50/p95, steady audio-s/s, RTF p50, errors, the server's memory and the GPU's, T3's
  waiting and decoding requests and tokens per stream (``gateway.tools.bench_http`` defines
  each figure); with ``--http-timelines`` also the first-audio stage medians of each row's
  first wave, steady span and the steady span's slowest tenth. ``loadtest``: ``gateway.tools.loadtest``
  at 64 streams for ``--loadtest-s`` seconds, every stream's audio length checked.

``--json`` writes ``{"card", "date", "command", "host", "rows": [the http rows], "stages": {every
other stage's output}}``, the shape of ``docs/benchmarks/*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway.settings import VOCODER_COMPILE_CHOICES
from gateway.tools.bench_http import TEXT_10S, pct
from gateway.tools.bench_t3 import T3STEP_MODELS


def _pct(values: list[float], q: float) -> float:
    value = pct(values, q)
    return float("nan") if value is None else value


async def _run_jobs(engine, jobs) -> tuple[float, list[float], float]:
    """Run jobs concurrently: (wall s, first-chunk latencies s, audio seconds made)."""
    from gateway.engine.base import SAMPLE_RATE

    async def one(job):
        t0 = time.perf_counter()
        first, samples = None, 0
        async for chunk in engine.synthesize(job):
            if first is None and chunk.samples.size:
                first = time.perf_counter() - t0
            samples += chunk.samples.size
        return first if first is not None else float("nan"), samples / SAMPLE_RATE

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(j) for j in jobs))
    wall = time.perf_counter() - t0
    return wall, [r[0] for r in res], sum(r[1] for r in res)


def _jobs(engine, n: int, tokens: int, streaming: bool, tag: str):
    from gateway.engine.base import GenerationParams, SynthesisJob, Voice

    voice = Voice("builtin", "builtin", engine.builtin_conditionals())
    return [SynthesisJob(f"{tag}-{i}", (TEXT_10S,), voice,
                         GenerationParams(max_speech_tokens=tokens), streaming=streaming)
            for i in range(n)]


def _gpu_used_gib() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**30, 1)


async def _measure(engine, name: str, tokens: int, ttfb_conc: list[int], agg_conc: list[int],
                   rtf_reps: int, deadline: float, one_shot_conc: list[int] = ()) -> list[dict]:
    rows: list[dict] = []
    rtfs = []
    for r in range(rtf_reps):
        wall, _, audio = await _run_jobs(engine, _jobs(engine, 1, tokens, False, f"{name}-rtf{r}"))
        rtfs.append(wall / audio if audio else float("nan"))
    rows.append({"stage": "engine", "engine": name, "metric": "single-stream RTF (10 s, non-streaming)",
                 "concurrency": 1, "value": round(statistics.median(rtfs), 4),
                 "detail": f"runs {[round(x, 4) for x in rtfs]}"})
    print(rows[-1], flush=True)
    for n in sorted(set(ttfb_conc) | set(agg_conc)):
        if time.perf_counter() > deadline:
            rows.append({"stage": "engine", "engine": name, "metric": "skipped (time budget)", "concurrency": n})
            continue
        wall, firsts, audio = await _run_jobs(engine, _jobs(engine, n, tokens, True, f"{name}-c{n}"))
        if n in ttfb_conc:
            rows.append({"stage": "engine", "engine": name, "metric": "TTFB ms p50 / p95 (streaming)",
                         "concurrency": n, "value": f"{_pct(firsts, .5) * 1000:.0f} / {_pct(firsts, .95) * 1000:.0f}"})
            print(rows[-1], flush=True)
        if n in agg_conc:
            rows.append({"stage": "engine", "engine": name, "metric": "audio-s per wall-s (streaming)",
                         "concurrency": n, "value": round(audio / wall, 1),
                         "detail": f"{audio:.0f} s audio in {wall:.2f} s; GPU used {_gpu_used_gib()} GiB"})
            print(rows[-1], flush=True)
    # Non-streaming: each utterance is vocoded in one flow pass once T3 has finished it.
    for n in one_shot_conc:
        if time.perf_counter() > deadline:
            rows.append({"stage": "engine", "engine": name, "metric": "skipped (time budget)",
                         "concurrency": n, "detail": "non-streaming"})
            continue
        wall, _, audio = await _run_jobs(engine, _jobs(engine, n, tokens, False, f"{name}-os{n}"))
        rows.append({"stage": "engine", "engine": name, "metric": "audio-s per wall-s (non-streaming)",
                     "concurrency": n, "value": round(audio / wall, 1),
                     "detail": f"{audio:.0f} s audio in {wall:.2f} s; GPU used {_gpu_used_gib()} GiB"})
        print(rows[-1], flush=True)
    return rows


async def stage_engine(tokens: int, concurrency: list[int], reference_concurrency: list[int],
                       budget_s: float) -> list[dict]:
    """VllmEngine vs ReferenceEngine, same dummy checkpoint, same process and GPU."""
    with tempfile.TemporaryDirectory(prefix="bench-") as cache_dir:  # the dummy checkpoint: GiBs, removed after
        return await _stage_engine(tokens, concurrency, reference_concurrency, budget_s, cache_dir)


async def _stage_engine(tokens: int, concurrency: list[int], reference_concurrency: list[int],
                        budget_s: float, cache_dir: str) -> list[dict]:
    from gateway.engine.reference.engine import ReferenceEngine
    from gateway.engine.vllm.engine import VllmEngine
    from gateway.settings import load_settings

    deadline = time.perf_counter() + budget_s
    settings = load_settings(environ={}, overrides={
        "load_format": "dummy", "cache_dir": cache_dir, "max_speech_tokens": tokens,
        "vllm_max_num_seqs": max(concurrency), "vllm_max_model_len": 1024,
        "vllm_gpu_memory_utilization": 0.4, "watermark": True})
    rows: list[dict] = []
    t0 = time.perf_counter()
    fast = VllmEngine(settings)
    fast.fixed_length = True  # dummy T3 may sample its stop token: keep lengths fixed
    await fast.start()
    rows.append({"stage": "engine", "engine": "vllm", "metric": "start s (dummy ckpt, vLLM compile + graphs)",
                 "value": round(time.perf_counter() - t0, 1), "detail": f"GPU used {_gpu_used_gib()} GiB"})
    print(rows[-1], flush=True)
    try:
        ttfb = [c for c in concurrency if c <= 32]
        rows += await _measure(fast, "vllm", tokens, ttfb, concurrency, 3, deadline, one_shot_conc=concurrency)
        fast.settings = msgspec.structs.replace(settings, watermark=False)
        for n in [c for c in concurrency if c in (1, 32)]:
            wall, firsts, audio = await _run_jobs(fast, _jobs(fast, n, tokens, True, f"nowm-{n}"))
            rows.append({"stage": "engine", "engine": "vllm", "metric": "watermark OFF: audio-s per wall-s / TTFB p50 ms",
                         "concurrency": n, "value": f"{audio / wall:.1f} / {_pct(firsts, .5) * 1000:.0f}"})
            print(rows[-1], flush=True)
        fast.settings = settings
        if not reference_concurrency:  # skipped: its figures do not change with our engine
            return rows
        ref = ReferenceEngine(settings)
        await ref.start()
        try:
            rows += await _measure(ref, "reference", tokens, [c for c in reference_concurrency if c <= 32],
                                   reference_concurrency, 2, deadline + 120)
        finally:
            await ref.close()
    finally:
        await fast.close()
    return rows


def _py_spy(args: argparse.Namespace, server_pid: int | None, out_dir: Path, label: str):
    """The http row's ``profile`` (``--http-py-spy-s``): py-spy on the server process tree and
    on this client process at once, for at most two thirds of the window less 2 s (the steady
    part), raw stacks under ``out_dir``. None when off or the server's process is unknown."""
    seconds = min(args.http_py_spy_s, args.http_window_s * 2 / 3 - 2)
    if seconds < 1 or server_pid is None:
        return None
    from gateway.tools import py_spy

    async def profile() -> dict[str, Any]:
        server, client = await asyncio.gather(
            py_spy.profile(server_pid, seconds, out_dir, f"server_{label}", subprocesses=True),
            py_spy.profile(os.getpid(), seconds, out_dir, f"client_{label}"))
        return {"server": server, "client": client}

    return profile


def stage_server(args: argparse.Namespace, stages: list[str],
                 checkpoint: Any = None) -> tuple[list[dict], dict[str, Any]]:
    """The stages that measure a live server (timeline, http, loadtest), on one server.
    ``checkpoint(rows, found)`` is called after every row and stage (the JSON is rewritten
    then, so a run cut short by a time limit keeps what it measured)."""
    save = checkpoint or (lambda rows, found: None)
    from gateway.tools import bench_http, bench_server, bench_timeline, loadtest, py_spy, timeline_log

    models = [m for m in args.models.split(",") if m]
    families = [f for f in (args.server_models or ",".join(m for m in models if m != "mixed")).split(",") if f]
    levels = [int(c) for c in args.http_concurrency.split(",")]
    peak = max(levels + [args.loadtest_concurrency if "loadtest" in stages else 1])
    out_dir = args.json.parent if args.json else Path(tempfile.gettempdir())
    log = args.server_log or out_dir / "server.log"
    raw_dir = out_dir / f"{args.json.stem if args.json else 'benchmark'}-pyspy"  # made by the first profile
    expect = args.tokens * 960 if args.server_engine == "vllm" else None  # fixed lengths: vLLM only
    snapshots = out_dir / "cuda-snapshots" if args.loadtest_cuda_snapshots and "loadtest" in stages else None
    extra = args.server_args.split() + (["--cuda-memory-snapshots", str(snapshots)] if snapshots else [])
    rows: list[dict] = []
    found: dict[str, Any] = {}
    with bench_server.running_server(engine=args.server_engine, models=families, tokens=args.tokens, peak=peak,
                                     log=log, cache_dir=args.server_cache_dir, extra=extra,
                                     url=args.server_url, pid=args.server_pid,
                                     ready_timeout_s=args.server_ready_s) as server:
        found["server"] = {"start_s": server.start_s, "models": families, "engine": args.server_engine,
                           "args": args.server_args, "log": str(log)}
        print(f"server ready in {server.start_s} s", flush=True)
        for stage in stages:
            try:
                if stage == "timeline":
                    if server.log is None:
                        raise RuntimeError("the timeline stage reads the log of a server it started")
                    result = bench_timeline.run_timeline(server.base, server.log, runs=args.timeline_runs,
                                                         model=models[0] if models[0] != "mixed" else families[0],
                                                         voice=args.voice, fmt=args.http_format)
                    bench_timeline.print_table(result)
                    found["timeline"] = result
                    save(rows, found)
                elif stage == "http":
                    for model in models:
                        for n in levels:
                            streams = bench_http.streams_for(model, n, families)
                            if args.http_timelines and server.log is None:
                                raise RuntimeError("--http-timelines reads the log of a server it started")
                            row = asyncio.run(bench_http.measure_level(
                                server.base, streams, window_s=args.http_window_s, voice=args.voice,
                                fmt=args.http_format, expect_samples=expect, server_pid=server.pid, label=model,
                                profile=_py_spy(args, server.pid, raw_dir, f"{model}_{n}"),
                                timeline_log=server.log if args.http_timelines else None))
                            rows.append(row)
                            print({k: v for k, v in row.items() if k not in ROW_APART}, flush=True)
                            if "server_died_at_s" in row:  # later rows and stages would measure nothing
                                raise ServerDied(row["server_died_at_s"], server.log)
                            for who, summary in (row.get("py_spy") or {}).items():
                                print(py_spy.table(summary, f"{who}, {model} x {n}"), flush=True)
                            for key in ("timeline_first_wave", "timeline_steady", "timeline_tail"):
                                if key in row:
                                    title = f"{key.replace('_', ' ')}: {model} x {n}, stage medians of the requests"
                                    print(timeline_log.table_text(title, row[key]), flush=True)
                            save(rows, found)
                elif stage == "loadtest":
                    target = out_dir / "loadtest.json"
                    argv = ["--url", server.base, "--concurrency", str(args.loadtest_concurrency),
                            "--duration", str(args.loadtest_s), "--voice", args.voice, "--format", args.http_format,
                            "--model", models[0] if models[0] != "mixed" else families[0], "--text", TEXT_10S,
                            "--json", str(target)]
                    if server.pid:
                        argv += ["--server-pid", str(server.pid)]
                    if expect:
                        argv += ["--expect-samples", str(expect)]
                    if snapshots:
                        argv += ["--cuda-snapshots", str(snapshots)]
                    code = loadtest.main(argv)
                    found["loadtest"] = {"exit": code, **(json.loads(target.read_text()) if target.exists() else {})}
                    save(rows, found)
            except ServerDied as died:
                print(died, flush=True)
                found.setdefault("errors", []).append({"stage": stage, "error": str(died)[:3000]})
                save(rows, found)
                break
            except Exception as exc:  # keep the other stages' numbers
                import traceback

                traceback.print_exc()
                found.setdefault("errors", []).append({"stage": stage, "error": repr(exc)[:500]})
                save(rows, found)
    if args.json and raw_dir.exists():  # py-spy's raw stacks: one archive beside the JSON
        archive = raw_dir.with_name(raw_dir.name + ".tar.xz")
        py_spy.pack(raw_dir, archive)
        for row in rows:
            for summary in (row.get("py_spy") or {}).values():
                summary["files"] = [f"{archive.name}:{Path(f).name}" for f in summary.get("files", [])]
        save(rows, found)
    return rows, found


class ServerDied(RuntimeError):
    """The server under measurement exited during a row: the run stops there (every later row
    and stage would only count connection errors), the end of its log in the message."""

    def __init__(self, at_s: float, log: Path | None) -> None:
        tail = ""
        if log is not None and log.exists():
            lines = log.read_text(errors="replace").splitlines()
            tail = "\n".join(line[:300] for line in lines[-LOG_TAIL_LINES:])
        super().__init__(f"the server died {at_s} s into the row; the rest of the run is skipped."
                         + (f" Its log ends:\n{tail}" if tail else ""))


LOG_TAIL_LINES = 15


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ROW_APART]  # printed with each row
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


SERVER_STAGES = ("timeline", "http", "loadtest")
ROW_APART = ("py_spy", "timeline_first_wave", "timeline_steady", "timeline_tail")
"""An http row's parts printed as tables of their own, not as columns."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="t3,engine,profile")
    ap.add_argument("--profile-batches", default="1,8,32,64", help="vocoder batch sizes of the profile stage")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--profile-configs", default="before,after",
                    help="before: estimator not compiled, one batch in flight; after: compiled, two in flight; "
                         "hift-fused: before with vocoder_hift_kernels fused (HiFT's weight norms folded, Snakes one kernel)")
    ap.add_argument("--profile-compile", default="dynamic", choices=VOCODER_COMPILE_CHOICES,
                    help="the after configuration's vocoder_compile")
    ap.add_argument("--profile-knobs", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the speed knobs (prompt length, first-window steps) on the after configuration")
    ap.add_argument("--profile-pipeline-batches", type=int, default=4, help="batches per pipelined measurement")
    ap.add_argument("--profile-oneshot-batches", default="1,32")
    ap.add_argument("--profile-knob-batches", default="1,32")
    ap.add_argument("--profile-prompt-tokens", type=int, default=250, help="the voice prompt's tokens")
    ap.add_argument("--profile-tiny", action="store_true", help="windows of a few tokens (a dry run on a CPU)")
    ap.add_argument("--watermark-batches", default="1,8,32,64", help="windows per batch of the watermark stage")
    ap.add_argument("--watermark-window-s", type=float, default=3.3, help="seconds per window of the watermark stage")
    ap.add_argument("--flow-steps", type=int, default=None,
                    help="CFM steps of the profile stage (default: the model's, 10 or Turbo's 2)")
    ap.add_argument("--profile-model", default="chatterbox", choices=("chatterbox", "chatterbox-turbo"),
                    help="whose vocoder the profile stage times (Turbo: S3Gen(meanflow=True), its mean-flow solve)")
    ap.add_argument("--tokens", type=int, default=250, help="speech tokens per request (250 = 10 s)")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--t3step-batches", default="1,32", help="batch sizes of the t3step stage")
    ap.add_argument("--t3step-penalty", choices=("sampler", "resident", "fused", "fused-eager"), default="fused",
                    help="the t3step stage's repetition penalty path (vllm_penalty; fused-eager: fused without its "
                         "Triton kernel); run each to compare")
    ap.add_argument("--t3step-cascade", action="store_true",
                    help="the t3step stage with vLLM's cascade attention (vllm_cascade_attention); run without to compare")
    ap.add_argument("--t3step-profile-batch", type=int, default=1,
                    help="rows of the t3step stage's profiled decode (the operator tables)")
    ap.add_argument("--t3step-py-spy-s", type=float, default=0.0,
                    help="py-spy on this process for this long while the largest t3step batch decodes (0: off)")
    ap.add_argument("--t3step-model", choices=T3STEP_MODELS, default="chatterbox",
                    help="the family whose T3 the t3step stage times (Turbo: GPT-2, no CFG, its own sampling)")
    ap.add_argument("--text-tokens", type=int, default=150)
    ap.add_argument("--reference-concurrency", default="1,8",
                    help="the reference engine serialises jobs (one model lock): its rate at 8 is its rate at any N;"
                         " 'none' skips it")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new engine measurements after this")
    ap.add_argument("--json", type=Path, default=None, help="write {card, date, command, rows, stages} here")
    server = ap.add_argument_group("the live-server stages (timeline, http, loadtest)")
    server.add_argument("--models", default="chatterbox",
                        help="API model names, one set of http rows each; 'mixed': the loaded families in turn")
    server.add_argument("--server-models", default=None,
                        help="families the server loads (default: those --models names)")
    server.add_argument("--server-engine", default="vllm", choices=["vllm", "reference", "fake"])
    server.add_argument("--server-args", default="", help="more serve flags, e.g. '--vocoder-compile dynamic'")
    server.add_argument("--server-cache-dir", default=None, help="the server's cache (dummy weights): default a temp dir")
    server.add_argument("--server-log", type=Path, default=None, help="default: server.log beside --json")
    server.add_argument("--server-url", default=None, help="measure this running server instead of starting one")
    server.add_argument("--server-pid", type=int, default=None, help="its process, for memory readings")
    server.add_argument("--server-ready-s", type=float, default=480.0, help="longest the server may take to start")
    server.add_argument("--voice", default="alloy", help="a clip voice by default (aria.flac)")
    server.add_argument("--http-concurrency", default="1,32,128")
    server.add_argument("--http-window-s", type=float, default=30.0, help="seconds each http row measures")
    server.add_argument("--http-format", default="pcm")
    server.add_argument("--timeline-runs", type=int, default=5)
    server.add_argument("--http-py-spy-s", type=float, default=0.0,
                        help="py-spy the server (and its children) and this client for this many seconds of each "
                             "http row's steady part (0: off; at most two thirds of the window less 2 s); the raw stacks "
                             "go into one <json stem>-pyspy.tar.xz beside --json")
    server.add_argument("--http-timelines", action="store_true",
                        help="every http request asks for its first-audio timeline; each row gets the stage medians "
                             "of its first wave and of its steady span (a server this starts)")
    server.add_argument("--loadtest-s", type=float, default=60.0)
    server.add_argument("--loadtest-concurrency", type=int, default=64)
    server.add_argument("--loadtest-cuda-snapshots", action="store_true",
                        help="the server records its CUDA allocations (cuda_memory_snapshots, beside --json) and the "
                             "load test reports the allocation sites whose memory grew over the load")
    args = ap.parse_args(argv)
    # A time limit's SIGTERM unwinds like an error: the server this started is stopped, and
    # the JSON written so far stays.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # vLLM forks its engine process by default; a fork after torch used its CPU thread
    # pool (prompt building) hangs the child, so start it fresh.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    conc = [int(c) for c in args.concurrency.split(",")]
    stages = [s for s in args.stages.split(",") if s]
    rows: list[dict] = []
    http_rows: list[dict] = []
    found: dict[str, Any] = {}
    def checkpoint(http: list[dict], stages_found: dict[str, Any]) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report(http, stages_found, argv), indent=1) + "\n")

    if any(stage in SERVER_STAGES for stage in stages):
        try:
            http_rows, found = stage_server(args, [s for s in stages if s in SERVER_STAGES], checkpoint)
        except Exception as exc:  # the server did not start: the other stages still run
            import traceback

            traceback.print_exc()
            found = {"errors": [{"stage": "server", "error": repr(exc)[:1500]}]}
    for stage in [s for s in stages if s not in SERVER_STAGES]:
        try:
            if stage == "t3":
                from gateway.tools.bench_t3 import stage_t3

                rows += stage_t3(args.tokens, conc, args.text_tokens)
            elif stage == "profile":
                from gateway.tools.bench_profile import stage_profile

                def profiled(row: dict) -> None:  # saved as it comes: a time limit keeps the rows so far
                    rows.append(row)
                    found["rows"] = rows
                    checkpoint(http_rows, found)

                steps = args.flow_steps or (2 if args.profile_model == "chatterbox-turbo" else 10)
                stage_profile(_ints(args.profile_batches), steps, args.profile_repeats, on_row=profiled,
                                      config_names=args.profile_configs.split(","), compile_mode=args.profile_compile,
                                      knobs=args.profile_knobs, pipeline_batches=args.profile_pipeline_batches,
                                      one_shot_batches=_ints(args.profile_oneshot_batches),
                                      knob_batches=_ints(args.profile_knob_batches),
                                      prompt_tokens=args.profile_prompt_tokens, tiny=args.profile_tiny,
                                      model=args.profile_model)
            elif stage == "t3step":
                from gateway.tools.bench_t3 import stage_t3_step

                out_dir = args.json.parent if args.json else Path(tempfile.gettempdir())
                raw = out_dir / f"{args.json.stem if args.json else 'benchmark'}-t3step-pyspy"
                rows += stage_t3_step(args.tokens, tuple(_ints(args.t3step_batches)), args.text_tokens,
                                      profile_path=out_dir / (f"t3_profile_{args.t3step_model}_{args.t3step_penalty}"
                                                            f"{'_cascade' if args.t3step_cascade else ''}.txt"),
                                      penalty=args.t3step_penalty, model=args.t3step_model,
                                      profile_batch=args.t3step_profile_batch, py_spy_s=args.t3step_py_spy_s,
                                      py_spy_dir=raw, cascade=args.t3step_cascade)
                if raw.exists():  # the raw stacks as one archive (the GPU machine returns few files)
                    from gateway.tools import py_spy

                    py_spy.pack(raw, raw.with_name(raw.name + ".tar.xz"))
            elif stage == "watermark":
                from gateway.tools.bench_watermark import stage_watermark

                rows += stage_watermark(_ints(args.watermark_batches), args.watermark_window_s, args.profile_repeats)
            elif stage == "engine":
                ref_conc = [int(c) for c in args.reference_concurrency.split(",") if c.strip() not in ("", "none")]
                rows += asyncio.run(stage_engine(args.tokens, conc, ref_conc, args.budget_s))
            else:
                raise ValueError(f"unknown stage {stage}")
        except Exception as exc:  # keep the other stages' numbers
            import traceback

            traceback.print_exc()
            rows.append({"stage": stage, "error": repr(exc)[:300]})
        found["rows"] = rows
        checkpoint(http_rows, found)
    _print_table(http_rows)
    _print_table(rows)
    failed = any("error" in r for r in rows) or bool(found.get("errors")) or any(r.get("errors") for r in http_rows)
    return 1 if failed else 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def report(http_rows: list[dict], stages: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """The benchmark's JSON document (docs/benchmarks/*.json)."""
    import datetime

    from gateway.tools.host_probes import card, host

    command = "python -m gateway.tools.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    return {"card": card(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "host": host(), "rows": http_rows, "stages": stages}


if __name__ == "__main__":
    sys.exit(main())
