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
* ``http``: the same figures as a client sees them: a live server (``python -m gateway serve
  --engine vllm``, dummy weights, a subprocess) and N concurrent streaming clients asking for
  mp3; time to first audio byte p50/p95 and audio-seconds per wall-second (audio seconds from
  the server's ``chatterbox_audio_seconds_total``); then, with ``--loadtest-s``, the load test
  (``gateway.tools.loadtest``, 64 streams) against the same server.
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

import msgspec

TEXT_10S = ("The quick brown fox jumps over the lazy dog while the gateway keeps every stream "
            "busy and the vocoder batches windows from all of them.")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


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


async def _http_level(base: str, n: int, fmt: str, voice: str = "default") -> tuple[float, list[float], int]:
    """n concurrent streaming requests: (wall s, first-byte latencies s, failures). The
    checkpoint's voice by default: the one the engine stage uses."""
    import httpx

    body = {"model": "tts-1", "input": TEXT_10S, "voice": voice, "response_format": fmt}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)

    async def one(client: httpx.AsyncClient) -> float | None:
        t0 = time.perf_counter()
        first = None
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                print(f"HTTP {response.status_code}: {response.text[:500]}", flush=True)
                return None
            async for part in response.aiter_bytes():
                if part and first is None:
                    first = time.perf_counter() - t0
        return first

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client) for _ in range(n)), return_exceptions=True)
        wall = time.perf_counter() - t0
    firsts = [r for r in res if isinstance(r, float)]
    return wall, firsts, n - len(firsts)


def _audio_seconds(base: str) -> float:
    import httpx

    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("chatterbox_audio_seconds_total"):
            return float(line.split()[-1])
    return float("nan")


def stage_http(tokens: int, concurrency: list[int], fmt: str, loadtest_s: float, out_dir: Path | None) -> list[dict]:
    """A live server on the vLLM engine and streaming HTTP clients (see the module docstring)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    peak = max(concurrency)
    cmd = [sys.executable, "-m", "gateway", "serve", "--engine", "vllm", "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(port), "--max-speech-tokens", str(tokens),
           "--max-in-flight", str(peak), "--max-queued", str(2 * peak), "--vllm-max-num-seqs", str(peak),
           # every stream comes from 127.0.0.1, one client: no fair share, or it would get a quarter
           "--max-client-share", "1",
           "--vllm-max-model-len", "1024", "--vllm-gpu-memory-utilization", "0.4",
           "--cache-dir", tempfile.mkdtemp(prefix="bench-http-")]
    log = open(Path(tempfile.gettempdir()) / "http_server.log", "w")  # large: one line per request
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rows: list[dict] = []
    try:
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > 400:
                raise RuntimeError(f"the server did not get ready (exit {server.poll()}); see {log.name}")
            time.sleep(0.5)
        rows.append({"stage": "http", "metric": "server start s (to /ready)", "value": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        asyncio.run(_http_level(base, 1, fmt))  # warm-up (first request per voice)
        for n in concurrency:
            before = _audio_seconds(base)
            wall, firsts, failed = asyncio.run(_http_level(base, n, fmt))
            audio = _audio_seconds(base) - before
            rows.append({"stage": "http", "metric": f"HTTP {fmt} streaming: TTFB ms p50 / p95, audio-s per wall-s",
                         "concurrency": n,
                         "value": f"{_pct(firsts, .5) * 1000:.0f} / {_pct(firsts, .95) * 1000:.0f}, {audio / wall:.1f}",
                         "detail": f"{audio:.0f} s audio in {wall:.2f} s; failed {failed}"})
            print(rows[-1], flush=True)
        wall, firsts, failed = asyncio.run(_http_level(base, 1, fmt, voice="alloy"))
        rows.append({"stage": "http", "metric": f"HTTP {fmt}: a clip voice (alloy), first request", "concurrency": 1,
                     "value": "failed" if failed else f"{wall:.2f} s (voice preparation included)"})
        print(rows[-1], flush=True)
        if loadtest_s > 0:
            from gateway.tools import loadtest

            target = (out_dir or Path(tempfile.gettempdir())) / "loadtest.json"
            code = loadtest.main(["--url", base, "--concurrency", "64", "--duration", str(loadtest_s), "--voice", "default",
                                  "--server-pid", str(server.pid), "--format", fmt, "--json", str(target)])
            rows.append({"stage": "http", "metric": f"loadtest 64 x {loadtest_s:.0f} s", "value": f"exit {code}",
                         "detail": target.read_text()[:1500] if target.exists() else ""})
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return rows


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="t3,engine,profile")
    ap.add_argument("--profile-batches", default="1,8,32", help="vocoder batch sizes of the profile stage")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--flow-steps", type=int, default=10, help="CFM steps of the profile stage")
    ap.add_argument("--tokens", type=int, default=250, help="speech tokens per request (250 = 10 s)")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--text-tokens", type=int, default=150)
    ap.add_argument("--reference-concurrency", default="1,8",
                    help="the reference engine serialises jobs (one model lock): its rate at 8 is its rate at any N;"
                         " 'none' skips it")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new engine measurements after this")
    ap.add_argument("--json", type=Path, default=None, help="also write every row here")
    ap.add_argument("--http-concurrency", default="1,8,32,128")
    ap.add_argument("--http-format", default="mp3")
    ap.add_argument("--loadtest-s", type=float, default=0.0, help="http stage: then a 64-stream load test this long")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # vLLM forks its engine process by default; a fork after torch used its CPU thread
    # pool (prompt building) hangs the child, so start it fresh.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    conc = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    for stage in args.stages.split(","):
        try:
            if stage == "t3":
                rows += stage_t3(args.tokens, conc, args.text_tokens)
            elif stage == "profile":
                rows += stage_profile([int(b) for b in args.profile_batches.split(",")], args.flow_steps,
                                      args.profile_repeats)
            elif stage == "http":
                rows += stage_http(args.tokens, [int(c) for c in args.http_concurrency.split(",")], args.http_format,
                                   args.loadtest_s, args.json.parent if args.json else None)
            elif stage == "engine":
                ref_conc = [int(c) for c in args.reference_concurrency.split(",") if c.strip() not in ("", "none")]
                rows += asyncio.run(stage_engine(args.tokens, conc, ref_conc, args.budget_s))
            else:
                raise ValueError(f"unknown stage {stage}")
        except Exception as exc:  # keep the other stages' numbers
            import traceback

            traceback.print_exc()
            rows.append({"stage": stage, "error": repr(exc)[:300]})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    _print_table(rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
