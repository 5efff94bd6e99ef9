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
* ``profile``: the batched S3Gen vocoder alone (random weights, bf16 flow, 250-token voice
  prompt), each part timed on the device with synchronisation: flow encoder, CFM decoder
  (all steps), HiFT, the device-to-host copy and the Perth watermark, for a first window
  (20 tokens), a regular window (50 + 25 left context) and a one-shot 10 s utterance, at
  batch 1/8/32, with the CFM solve eager and through its CUDA graphs: what bounds time to
  first audio and throughput.
* ``timeline``, ``http``, ``loadtest``: as a client sees it, through one live server
  (``python -m gateway serve --engine vllm``, dummy weights, a subprocess started once for
  all three; ``gateway.tools.bench_server``). ``timeline``: every stage of one request's first
  audio, from the server's log (``gateway.tools.bench_timeline``). ``http``: one row per model
  (``--models``; ``mixed`` = the loaded families in turn) and concurrency: first audio
  p50/p95, steady audio-s/s, RTF p50, errors, the server's memory and the GPU's
  (``gateway.tools.bench_http`` defines each figure). ``loadtest``: ``gateway.tools.loadtest``
  at 64 streams for ``--loadtest-s`` seconds, every stream's audio length checked.

``--json`` writes ``{"card", "date", "command", "rows": [the http rows], "stages": {every
other stage's output}}``, the shape of ``docs/benchmarks/*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway.tools.bench_http import TEXT_10S, pct


def _pct(values: list[float], q: float) -> float:
    value = pct(values, q)
    return float("nan") if value is None else value


def stage_t3(tokens: int, concurrency: list[int], text_tokens: int) -> list[dict]:
    """Offline vLLM decode throughput of the T3 model with CFG, dummy weights."""
    import torch
    from vllm import LLM, SamplingParams

    from gateway.engine.vllm.t3.config import write_model_dir
    from gateway.engine.vllm.t3.plugin import register
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder

    register()
    torch.manual_seed(0)
    builder = T3PromptBuilder()
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    cond = T3Cond(speaker_emb=torch.randn(1, 256), cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150)),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    rows = builder.conditioning(cond)
    text = [255] + torch.randint(1, 704, (text_tokens,)).tolist() + [0]
    model_dir = write_model_dir(Path(tempfile.mkdtemp()) / "t3")
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, enable_prompt_embeds=True, dtype="bfloat16",
              load_format="dummy", max_model_len=1024, max_num_seqs=max(concurrency),
              gpu_memory_utilization=0.5, seed=0)
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.8, top_p=1.0, min_p=0.05,
                        repetition_penalty=1.2, detokenize=False)
    out = []
    llm.generate([builder.build(rows, text, 0.5).vllm_prompt()], sp, use_tqdm=False)  # warm
    for n in concurrency:
        prompts = [builder.build(rows, text, 0.5).vllm_prompt() for _ in range(n)]
        t0 = time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        made = sum(len(r.outputs[0].token_ids) for r in res)
        out.append({"stage": "t3", "concurrency": n, "wall_s": round(dt, 3), "tokens": made,
                    "tokens_per_s": round(made / dt), "audio_s_per_s": round(made / dt / 25, 1)})
        print(out[-1], flush=True)
    return out



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
    from gateway.engine.reference.engine import ReferenceEngine
    from gateway.engine.vllm.engine import VllmEngine
    from gateway.settings import load_settings

    deadline = time.perf_counter() + budget_s
    settings = load_settings(environ={}, overrides={
        "load_format": "dummy", "cache_dir": tempfile.mkdtemp(prefix="bench-"), "max_speech_tokens": tokens,
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


def stage_profile(batches: list[int], flow_steps: int, repeats: int, prompt_tokens: int = 250) -> list[dict]:
    """Per-part device time of one vocoder batch (see the module docstring)."""
    import torch

    from gateway.engine.base import SAMPLE_RATE
    from gateway.engine.vllm.s3gen_batch import FlowRow, HiftRow, NoiseTapes, S3GenBatch, StageTimer
    from gateway.tools.parity_vocoder import reference_dict

    from chatterbox.models.s3gen import S3Gen

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    s3gen = S3Gen().to(device).eval()
    ref = reference_dict(s3gen, prompt_tokens, 120.0, 0)
    tapes = NoiseTapes.generate(0, flow_frames=2 * (prompt_tokens + 600), hift_samples=600 * 2 * 480,
                                harmonics=s3gen.mel2wav.m_source.l_sin_gen.harmonic_num + 1, device=device)
    batch = S3GenBatch(s3gen, device=device, flow_dtype=dtype, flow_steps=flow_steps, tapes=tapes)
    voice = batch.prepare_voice(ref)
    graph_s = None
    if device == "cuda":
        from gateway.engine.vllm.cfm_solver import GraphBuckets

        graph_s = batch.cfm.capture(GraphBuckets.plan(max_rows=max(batches), max_frames=1024))
        print(f"profile: {len(batch.cfm._graphs)} CFM graphs captured in {graph_s:.1f} s, "
              f"{batch.cfm.graph_bytes / 2**20:.0f} MiB", flush=True)
    buckets = batch.cfm.buckets
    watermarker = None
    try:
        import perth

        watermarker = perth.PerthImplicitWatermarker(device=device)
    except Exception as exc:  # noqa: BLE001 - the rest of the profile is still worth printing
        print(f"profile: no watermarker ({exc!r})", flush=True)
    gen = torch.Generator().manual_seed(0)
    # (name, left context, new tokens, final, carried mel frames)
    kinds = [("first window", 0, 20, False, 0), ("regular window", 25, 50, False, 8),
             ("one-shot 10 s", 0, 250, True, 0)]
    timer = StageTimer(device)
    rows: list[dict] = []
    modes = ["eager"] + (["graphs"] if buckets is not None else [])
    for (name, context, new, final, carried), mode, b in (
            (k, m, b) for k in kinds for b in batches for m in modes):
        n_in = context + new + (0 if final else batch.lookahead)
        batch.cfm.buckets = buckets if mode == "graphs" else None
        flow_rows = [FlowRow(voice, torch.randint(0, 6561, (n_in,), generator=gen).tolist(), 0, new, final)
                     for _ in range(b)]
        samples: dict[str, list[float]] = {}
        for rep in range(repeats + 1):  # the first run warms up (cuDNN autotune, allocator)
            batch.timer = timer
            timer.reset()
            t0 = time.perf_counter()
            mels = batch.run_flow(flow_rows)
            hift_rows = [HiftRow(torch.cat([m[:, :carried], m], dim=1) if carried else m, 0, None,
                                 0 if final else 8) for m in mels]
            waves = batch.run_hift(hift_rows)
            with timer.section("host copy"):
                host = [w.cpu().numpy() for w, _ in waves]
            if watermarker is not None:
                with timer.section("watermark (per row, serial)"):
                    for audio in host:
                        watermarker.apply_watermark(audio, sample_rate=SAMPLE_RATE)
            total = time.perf_counter() - t0
            batch.timer = None
            if rep:
                for part, sec in timer.seconds.items():
                    samples.setdefault(part, []).append(sec)
                samples.setdefault("total", []).append(total)
        med = {part: statistics.median(v) * 1000 for part, v in samples.items()}
        audio_s = b * new / 25
        row = {"stage": "profile", "window": f"{name} ({n_in} + {prompt_tokens} prompt tokens)",
               "batch": b, "CFM": mode, **{f"{k} ms": round(v, 1) for k, v in med.items()},
               "vocoder audio-s/s (no watermark)": round(audio_s / ((med["total"] - med.get(
                   "watermark (per row, serial)", 0.0)) / 1000), 1)}
        rows.append(row)
        print(row, flush=True)
        del mels, waves, host
    return rows


def stage_server(args: argparse.Namespace, stages: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """The stages that measure a live server (timeline, http, loadtest), on one server."""
    from gateway.tools import bench_http, bench_server, bench_timeline, loadtest

    models = [m for m in args.models.split(",") if m]
    families = [f for f in (args.server_models or ",".join(m for m in models if m != "mixed")).split(",") if f]
    levels = [int(c) for c in args.http_concurrency.split(",")]
    peak = max(levels + [args.loadtest_concurrency if "loadtest" in stages else 1])
    out_dir = args.json.parent if args.json else Path(tempfile.gettempdir())
    log = args.server_log or out_dir / "server.log"
    expect = args.tokens * 960 if args.server_engine == "vllm" else None  # fixed lengths: vLLM only
    rows: list[dict] = []
    found: dict[str, Any] = {}
    with bench_server.running_server(engine=args.server_engine, models=families, tokens=args.tokens, peak=peak,
                                     log=log, cache_dir=args.server_cache_dir, extra=args.server_args.split(),
                                     url=args.server_url, pid=args.server_pid) as server:
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
                elif stage == "http":
                    for model in models:
                        for n in levels:
                            streams = bench_http.streams_for(model, n, families)
                            row = asyncio.run(bench_http.measure_level(
                                server.base, streams, window_s=args.http_window_s, voice=args.voice,
                                fmt=args.http_format, expect_samples=expect, server_pid=server.pid, label=model))
                            rows.append(row)
                            print(row, flush=True)
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
                    code = loadtest.main(argv)
                    found["loadtest"] = {"exit": code, **(json.loads(target.read_text()) if target.exists() else {})}
            except Exception as exc:  # keep the other stages' numbers
                import traceback

                traceback.print_exc()
                found.setdefault("errors", []).append({"stage": stage, "error": repr(exc)[:500]})
    return rows, found


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


SERVER_STAGES = ("timeline", "http", "loadtest")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="t3,engine,profile")
    ap.add_argument("--profile-batches", default="1,8,32,64", help="vocoder batch sizes of the profile stage")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--flow-steps", type=int, default=10, help="CFM steps of the profile stage")
    ap.add_argument("--tokens", type=int, default=250, help="speech tokens per request (250 = 10 s)")
    ap.add_argument("--concurrency", default="1,8,32,128")
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
    server.add_argument("--voice", default="alloy", help="a clip voice by default (aria.flac)")
    server.add_argument("--http-concurrency", default="1,32,128")
    server.add_argument("--http-window-s", type=float, default=30.0, help="seconds each http row measures")
    server.add_argument("--http-format", default="pcm")
    server.add_argument("--timeline-runs", type=int, default=5)
    server.add_argument("--loadtest-s", type=float, default=60.0)
    server.add_argument("--loadtest-concurrency", type=int, default=64)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # vLLM forks its engine process by default; a fork after torch used its CPU thread
    # pool (prompt building) hangs the child, so start it fresh.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    conc = [int(c) for c in args.concurrency.split(",")]
    stages = [s for s in args.stages.split(",") if s]
    rows: list[dict] = []
    http_rows: list[dict] = []
    found: dict[str, Any] = {}
    if any(stage in SERVER_STAGES for stage in stages):
        try:
            http_rows, found = stage_server(args, [s for s in stages if s in SERVER_STAGES])
        except Exception as exc:  # the server did not start: the other stages still run
            import traceback

            traceback.print_exc()
            found = {"errors": [{"stage": "server", "error": repr(exc)[:1500]}]}
    for stage in [s for s in stages if s not in SERVER_STAGES]:
        try:
            if stage == "t3":
                rows += stage_t3(args.tokens, conc, args.text_tokens)
            elif stage == "profile":
                rows += stage_profile([int(b) for b in args.profile_batches.split(",")], args.flow_steps,
                                      args.profile_repeats)
            elif stage == "engine":
                ref_conc = [int(c) for c in args.reference_concurrency.split(",") if c.strip() not in ("", "none")]
                rows += asyncio.run(stage_engine(args.tokens, conc, ref_conc, args.budget_s))
            else:
                raise ValueError(f"unknown stage {stage}")
        except Exception as exc:  # keep the other stages' numbers
            import traceback

            traceback.print_exc()
            rows.append({"stage": stage, "error": repr(exc)[:300]})
    if rows:
        found["rows"] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report(http_rows, found, argv), indent=1) + "\n")
    _print_table(http_rows)
    _print_table(rows)
    failed = any("error" in r for r in rows) or bool(found.get("errors")) or any(r.get("errors") for r in http_rows)
    return 1 if failed else 0


def report(http_rows: list[dict], stages: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """The benchmark's JSON document (docs/benchmarks/*.json)."""
    import datetime

    from gateway.tools.host_probes import card

    command = "python -m gateway.tools.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    return {"card": card(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "rows": http_rows, "stages": stages}


if __name__ == "__main__":
    sys.exit(main())
