"""The vLLM engine's host side under many streams, with the GPU's work stood in for.

The question: at hundreds of streams, can the server's host side (one event loop and a few
threads) keep up with what T3 and the vocoder produce on the GPU? On an H200 the 256-stream
Turbo row gave ~194 audio-s per s while T3 alone stepped 256 rows every 12.7 ms (~805 audio-s
per s) and the vocoder was 42% busy. This runs the engine's own code for everything that is
host work: ``VllmEngine.synthesize`` with the family's real text front end and T3 prompt
rows, the thread engine core (``ThreadedLLM``) and its hand-off, the token task, the vocoder
stream's windows, the vocoder loop's planning and pipelining, seams and crossfades, the
chunks to the caller. What runs on the GPU is stood in for:

* T3: every live request gets its next speech token each step, a step taking
  ``--t3-step-ms A,B`` = A + B x rows milliseconds (slept, the GIL free, as a GPU step waits).
  The default, 2.7 + 0.039 x rows, follows Turbo's T3 alone on the H200 (~2.7 ms at one row,
  12.7 at 256: docs/benchmarks.md).
* the vocoder's batch (S3Gen's flow and HiFT, and the host work of building its inputs): the
  rows' audio as zeros of the right length after ``--vocoder-ms A,B,C`` = A + B x rows + C x
  (the batch's flow mel frames / 1000) milliseconds on the vocoder's worker thread (default
  0: the host ceiling). ``100,0,34`` models the H200 of 2026-12-05: ~0.034 ms a flow frame
  at 64 rows (one-shot vocoding, 10 steps, bf16), ~0.1 s for a lone first window; with it a
  window schedule's cost shows up in the row's throughput and first audio, not only in its
  flow frames per audio-second. Each row's frames are those of the CUDA graph width it pads
  to (the widths the served settings capture, as if captured: ``--setting
  vocoder_cuda_graphs=false`` charges each row its own).

No watermark (its host part, resampling, costs ~0.4 ms per audio-second on one core here).
Streams consume ``synthesize`` directly (no HTTP: the HTTP benchmark's fake-engine rows
measure that path). One short utterance runs before each row's window (first-call costs
out, as the server's warm-up keeps them out of requests). Each row prints the audio-seconds
per second in the steady part of the window (from a third of it), first audio, and the
process's CPU seconds per audio second.

``--vocoder real`` runs the served vocoder instead of the stand-in: S3Gen (random weights) on
``--device`` (CUDA when there is one) with the engine's dtype, windows, CUDA graphs and
pipelining, and ``--watermark`` adds the engine's batched Perth pass: the whole engine but
vLLM, so a row shows what the vocoder gives with T3 paced and nothing else on the GPU, and a
fault in the vocoder's device work shows up without a server around it (the first error's
traceback goes to stderr and the row's JSON). ``--setting KEY=VALUE`` overrides a server
setting (``vocoder_cuda_graphs=false``, ``vocoder_max_batch=32``).

``python -m gateway.tools.bench_engine_host --model chatterbox-turbo --streams 1,64,256``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from gateway.engine.base import SAMPLE_RATE, GenerationParams, SynthesisJob, Voice
from gateway.engine.vllm.engine_thread import ThreadedLLM
from gateway.engine.vllm.s3gen_batch import MEL_BINS, BatchClock, HostCopy
from gateway.engine.vllm.vocoder import Vocoder, _Launched, cfm_buckets
from gateway.engine.vllm.vocoder_stream import WindowJob, WindowResult
from gateway.engine.vllm.vocoder_windows import SAMPLES_PER_FRAME, TOKEN_MEL_RATIO
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO
from gateway.observability.playback import RealTimePlayer
from gateway.settings import Settings, load_settings
from gateway.tools import host_probes
from gateway.tools.bench_host import TickEngine
from gateway.tools.host_probes import cpu_card
from gateway.tools.bench_http import ms, pct, stall_figures

TEXT = ("The quick brown fox jumps over the lazy dog while the band plays on, and everyone in the "
        "square stops to listen for a while.")
SPEECH_TOKENS = 250
"""Each utterance's speech tokens: 10 s of audio, as the HTTP rows' 10 s text."""
VOICE_PROMPT_TOKENS = 250
"""The voice prompt the vocoder's windows carry (10 s, upstream's most)."""
TOKENS_PER_AUDIO_S = 25


class SteppedT3(TickEngine):
    """vLLM's ``LLMEngine`` as ``ThreadedLLM`` drives it (``bench_host.TickEngine``: every
    live request its next speech token each step, a request ending after ``tokens``), each
    step first sleeping the modelled GPU time for its rows."""

    def __init__(self, tokens: int, step_ms: tuple[float, float]) -> None:
        super().__init__(tokens)
        self.step_ms = step_ms

    def step(self) -> list[SimpleNamespace]:
        a, b = self.step_ms
        if a or b:
            time.sleep((a + b * len(self.live)) / 1000)
        return super().step()


class DeviceFreeVocoder(Vocoder):
    """The vocoder loop as served, its batches' device work (and the host work of building
    their inputs) stood in for: each row's audio is zeros of the length S3Gen gives it, ready
    ``batch_ms`` = A + B x rows + C x (flow mel frames / 1000) milliseconds after it starts
    (the frames each row's flow solves: its voice prompt and window, 2 a token; on an H200
    the vocoder's time follows them, docs/benchmarks.md). A loop's batches run one after
    another, as on its CUDA stream: one launched while another runs starts when it ends
    (until 2026-12-06 the stand-in ran the two in flight side by side)."""

    batch_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _ready_at: dict[int, float]  # worker thread only: a launched batch's audio is ready then
    _free_at: float  # worker thread only: when the stand-in device has run every batch launched

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ready_at = {}
        self._free_at = 0.0

    def _launch_batch(self, jobs: list[WindowJob], refs: Any) -> _Launched:
        clock = BatchClock(torch.device("cpu"))
        # the served vocoder keeps the last ``vocoder_prompt_tokens`` of the voice's prompt
        prompt = min(VOICE_PROMPT_TOKENS, self.batch.prompt_tokens or VOICE_PROMPT_TOKENS)
        outcomes: list[WindowResult | Exception | None] = []
        for job in jobs:
            frames = TOKEN_MEL_RATIO * job.window.new_tokens + (0 if job.mel_tail is None else job.mel_tail.shape[1])
            outcomes.append(WindowResult(
                np.zeros(frames * SAMPLES_PER_FRAME, np.float32), frames,
                torch.zeros(MEL_BINS, job.carry) if job.carry else None,
                torch.zeros(self.batch.harmonics) if job.carry else None, prompt))
        launched = _Launched(jobs, outcomes, {}, HostCopy([], clock), clock)
        a, b, c = self.batch_ms
        # each row's flow at the CUDA graph width it pads to (as served), else its own
        frames = sum(self.batch.cfm.frames_for(TOKEN_MEL_RATIO * (prompt + job.window.input_tokens))
                     for job in jobs)
        # the loop's batches run one after another on its stream, as on a GPU: a batch launched
        # while another runs (the loop keeps ``pipeline_depth`` in flight) starts when it ends
        start = max(time.perf_counter(), self._free_at)
        self._free_at = self._ready_at[id(launched)] = start + (a + b * len(jobs) + c * frames / 1000) / 1000
        return launched

    def finish_batch(self, launched: _Launched) -> list[WindowResult | Exception]:
        wait = self._ready_at.pop(id(launched)) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return launched.outcomes  # type: ignore[return-value]


@contextlib.contextmanager
def sampling_without_vllm() -> Iterator[None]:
    """Where vLLM is not installed its ``SamplingParams`` cannot be built: the stand-in T3
    ignores them, so the request's own ``T3Sampling`` goes in their place (for this run only)."""
    from gateway.engine.factory import vllm_installed
    from gateway.engine.vllm.t3.families import T3Sampling

    if vllm_installed():
        yield
        return
    real = T3Sampling.to_vllm
    T3Sampling.to_vllm = lambda self: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        T3Sampling.to_vllm = real  # type: ignore[method-assign]


def engine_settings(model: str, streams: int, cache_dir: str, overrides: dict[str, Any] | None = None,
                    *, watermark: bool = False) -> Settings:
    return load_settings(environ={}, overrides={
        "load_format": "dummy", "cache_dir": cache_dir, "models": [model], "watermark": watermark,
        "max_speech_tokens": SPEECH_TOKENS, "fixed_speech_tokens": True, "max_in_flight": max(streams, 1),
        "vllm_max_num_seqs": max(streams, 1), **(overrides or {})})


def build_engine(model: str, settings: Settings, step_ms: tuple[float, float], vocoder_ms: tuple[float, ...],
                 tokens: int, root: Path, *, device: str | None = None) -> Any:
    """A VllmEngine as ``start()`` leaves it, with the GPU's parts stood in for (see the
    module docstring); the family's text front end and T3 front are the real ones (random
    weights). ``device``: the served vocoder (and, with ``settings.watermark``, the batched
    watermark) on that device instead of the stand-ins. Needs a running event loop (the
    vocoder's loop starts in ``start_parts``)."""
    from chatterbox.models.s3gen import S3Gen

    from gateway.engine.checkpoint.dummy import write_tokenizer
    from gateway.engine.checkpoint.modules import t3_config
    from gateway.engine.checkpoint.text_front_ends import load_front_end
    from gateway.engine.vllm.engine import VllmEngine
    from gateway.engine.vllm.t3.families import LlamaFamilyT3, TurboFamilyT3
    from gateway.engine.vllm.t3.prompt import T3PromptBuilder
    from gateway.engine.vllm.t3.turbo import TurboPromptBuilder
    from gateway.engine.vllm.voice_rows import VoiceRowsCache

    family = FAMILIES[model]
    words = root / model
    words.mkdir(parents=True, exist_ok=True)
    write_tokenizer(words, family)
    t3: Any = (TurboFamilyT3(family, TurboPromptBuilder()) if model == TURBO
               else LlamaFamilyT3(family, T3PromptBuilder(t3_config(family))))
    front_end = load_front_end(words, family)
    engine = VllmEngine(settings)
    runtime = engine.runtimes[model]
    runtime.components = SimpleNamespace(front_end=front_end, tokenizer=front_end.tokenizer, family=family,
                                         builtin_conditionals=None, watermarker=None)
    runtime.t3 = t3
    runtime.rows = VoiceRowsCache(t3.voice_rows, 4)
    s3gen = S3Gen(meanflow=model == TURBO).eval()
    if device is None:
        vocoder = DeviceFreeVocoder(s3gen, settings, flow_steps=family.flow_steps)
        # with vocoder_first_window_lane_rows, its lane stands in the same way (its batches
        # overlap the main loop's perfectly here; on a GPU the two share the card)
        for loop in (vocoder, vocoder.first_lane) if vocoder.first_lane is not None else (vocoder,):
            loop.batch_ms = (*vocoder_ms, 0.0, 0.0, 0.0)[:3]  # A[, B[, C]]
            if settings.vocoder_cuda_graphs:  # the CFM graph widths a GPU would capture, as if captured
                loop.batch.cfm.buckets = cfm_buckets(
                    loop.policy, loop.settings, max_rows=loop.max_batch_rows,
                    max_cells=TOKEN_MEL_RATIO * loop.max_batch_tokens,
                    max_frames=loop.first_window_top() if loop.lane else None)
        runtime.vocoder = vocoder
    else:  # as VllmEngine.start builds them
        runtime.components.s3gen = s3gen.to(device)
        if settings.watermark:
            from gateway.engine.checkpoint.components import load_watermarker
            from gateway.engine.vllm.watermark_batch import WatermarkBatcher

            engine._watermark = WatermarkBatcher(load_watermarker(device), SAMPLE_RATE,
                                                 stream=settings.watermark_stream,
                                                 first_apart=settings.watermark_first_apart)
            engine._mark = engine._watermark.apply
        engine._build_vocoder(runtime, torch.device(device))
    runtime.llm = ThreadedLLM(lambda: SteppedT3(tokens, step_ms), name="vllm-engine")
    engine._loaded = True
    return engine


def voice_for(model: str) -> Voice:
    """A voice: T3 conditioning of the family's prompt length, an S3Gen reference of 10 s."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    g = torch.Generator().manual_seed(1)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 375 if model == TURBO else 150), generator=g),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    ref = {"prompt_token": torch.randint(0, 6561, (1, VOICE_PROMPT_TOKENS), generator=g),
           "prompt_token_len": torch.tensor([VOICE_PROMPT_TOKENS]),
           "prompt_feat": torch.zeros(1, TOKEN_MEL_RATIO * VOICE_PROMPT_TOKENS, MEL_BINS), "prompt_feat_len": None,
           "embedding": torch.randn(1, 192, generator=g)}
    return Voice("bench", f"bench-{model}", Conditionals(cond, ref))


async def measure(model: str, streams: int, seconds: float, step_ms: tuple[float, float],
                  vocoder_ms: tuple[float, ...], tokens: int = SPEECH_TOKENS, *, device: str | None = None,
                  watermark: bool = False, overrides: dict[str, Any] | None = None,
                  stagger_s: float = 0.0) -> dict[str, Any]:
    """One row: ``streams`` consumers, each starting its next utterance when one ends.
    ``device``: the served vocoder there (``--vocoder real``), else the stand-in.
    ``stagger_s``: consumer ``i`` starts ``i / streams`` of it late (0: all at once, so the
    streams' windows fall due together, wave after wave; the served benchmark's streams drift
    apart, and a new stream's first window meets the others' later ones)."""
    with tempfile.TemporaryDirectory(prefix="bench-engine-host-") as tmp, sampling_without_vllm():
        settings = engine_settings(model, streams, tmp, overrides, watermark=watermark)
        t_build = time.perf_counter()
        engine = build_engine(model, settings, step_ms, vocoder_ms, tokens, Path(tmp), device=device)
        build_s = time.perf_counter() - t_build
        await engine.runtimes[model].vocoder.start()
        voice = voice_for(model)
        # One utterance before the window, as the server's own warm-up: first-call costs (on a
        # GPU machine, vLLM's import for its SamplingParams: seconds of the event loop) stay out.
        warm = SynthesisJob("warm-up", (TEXT,), voice, GenerationParams(max_speech_tokens=min(tokens, 30)),
                            model=model, streaming=True)
        async for _ in engine.synthesize(warm):
            pass
        arrivals: list[tuple[float, int]] = []
        firsts: list[float] = []
        stalls: list[float] = []  # per utterance played out: seconds a real-time player waited
        errors: list[str] = []
        traces: list[str] = []
        done = [0]
        t0 = time.perf_counter()
        end = t0 + seconds

        async def consume(i: int) -> None:
            n = 0
            if stagger_s:
                await asyncio.sleep(stagger_s * i / streams)
            while time.perf_counter() < end:
                job = SynthesisJob(f"s{i}-{n}", (TEXT,), voice, GenerationParams(max_speech_tokens=tokens),
                                   model=model, streaming=True)
                sent, first = time.perf_counter(), True
                player = RealTimePlayer()
                try:
                    async for chunk in engine.synthesize(job):
                        now = time.perf_counter()
                        if first:
                            firsts.append(now - sent)
                            first = False
                        arrivals.append((now, int(chunk.samples.size)))
                        player.arrive(now, chunk.samples.size / SAMPLE_RATE)
                    if player.until is not None and time.perf_counter() <= end:  # made within the window
                        stalls.append(player.stalled_s)
                except Exception as exc:  # noqa: BLE001 - counted and named in the row
                    errors.append(f"{type(exc).__name__}: {exc}")
                    if not traces:  # where the first one came from (a device fault's op, under CUDA_LAUNCH_BLOCKING)
                        traces.append("".join(traceback.format_exception(exc)))
                    return
                done[0] += 1
                n += 1

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        before = engine.batch_stats()  # the vocoder's and the watermark's counters at the window's start
        consumers = [asyncio.create_task(consume(i)) for i in range(streams)]
        await asyncio.sleep(seconds)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        stats = engine.batch_stats()
        busy, device_busy = stats.busy_s - before.busy_s, stats.device_busy_s - before.device_busy_s
        frames, vocoded = stats.flow_frames - before.flow_frames, stats.audio_s - before.audio_s
        whole = stats.whole_windows - before.whole_windows
        marked = None
        if engine._watermark is not None:  # the watermark pass: busy share, rows a pass
            passes = stats.watermark_passes - before.watermark_passes
            marked = (round((stats.watermark_busy_s - before.watermark_busy_s) / seconds, 3),
                      round((stats.watermark_rows - before.watermark_rows) / passes, 1) if passes else None)
        await engine.close()
    steady_from = t0 + seconds / 3
    steady = sum(n for at, n in arrivals if steady_from <= at <= end) / SAMPLE_RATE / (end - steady_from)
    audio = sum(n for at, n in arrivals if at <= end) / SAMPLE_RATE
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    step = step_ms[0] + step_ms[1] * streams
    # a token a stream a step; each utterance's audio also holds the family's silence tail
    tail = (tokens + FAMILIES[model].silence_tail_tokens) / tokens
    ceiling = streams * 1000 / step / TOKENS_PER_AUDIO_S * tail if step else None
    return {
        "model": model, "streams": streams, "window_s": seconds, "stagger_s": stagger_s,
        "steady_audio_s_per_s": round(steady, 1),
        "t3_alone_audio_s_per_s": None if ceiling is None else round(ceiling, 1),
        "first_audio_p50_ms": ms(pct(firsts, 0.5)),
        "first_audio_p95_ms": ms(pct(firsts, 0.95)),
        # a player starting at each utterance's first audio, in real time: how long it waited
        **stall_figures(stalls),
        "utterances_done": done[0],
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "cpu_s_per_audio_s": round(cpu / audio, 4) if audio else None,
        "process_cpu_share": round(cpu / seconds, 2),
        "vocoder_rows_per_batch": round(stats.rows / stats.batches, 1) if stats.batches else None,
        "vocoder": "stand-in" if device is None else f"real ({device})", "watermark": watermark,
        "vocoder_busy_share": round(busy / seconds, 3), "vocoder_device_busy_share": round(device_busy / seconds, 3),
        # the window schedule's cost: flow mel frames per audio-second (one-shot ~100), whole utterances
        "vocoder_flow_frames_per_audio_s": round(frames / vocoded, 1) if vocoded else None,
        "vocoder_whole_utterance_windows": whole,
        "watermark_busy_share": marked[0] if marked else None,
        "watermark_rows_per_pass": marked[1] if marked else None,
        "start_s": round(build_s, 1),
        "first_error_trace": traces[0] if traces else None,
    }


def setting_arg(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON where it parses (numbers, true/false), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _floats(count: int) -> Callable[[str], tuple[float, ...]]:
    """A parser of ``A[,B...]``: at most ``count`` numbers, the absent ones 0."""
    def parse(text: str) -> tuple[float, ...]:
        parts = [float(x) for x in text.split(",")]
        if not 1 <= len(parts) <= count:
            raise argparse.ArgumentTypeError(f"at most {count} comma-separated numbers")
        return tuple(parts + [0.0] * (count - len(parts)))
    return parse


_pair = _floats(2)
"""``A[,B]``: a T3 step's cost terms."""
_costs = _floats(3)
"""``A[,B[,C]]``: the stand-in vocoder's batch cost terms."""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TURBO, choices=[ORIGINAL, TURBO, MULTILINGUAL])
    p.add_argument("--streams", default="1,64,256", help="comma-separated stream counts, one row each")
    p.add_argument("--seconds", type=float, default=12.0, help="each row's window")
    p.add_argument("--t3-step-ms", type=_pair, default=(2.7, 0.039), help="A,B: a T3 step takes A + B x rows ms")
    p.add_argument("--vocoder-ms", type=_costs, default=(0.0, 0.0, 0.0),
                   help="A,B[,C]: a stand-in vocoder batch takes A + B x rows + C x flow mel frames / 1000 ms")
    p.add_argument("--tokens", type=int, default=SPEECH_TOKENS, help="speech tokens per utterance")
    p.add_argument("--stagger-s", type=float, default=0.0,
                   help="spread the streams' first requests over this many seconds (0: all at once)")
    p.add_argument("--vocoder", choices=["stand-in", "real"], default="stand-in",
                   help="real: the served vocoder on --device (the module docstring)")
    p.add_argument("--device", default=None, help="the real vocoder's device (default: cuda if there is one)")
    p.add_argument("--watermark", action="store_true", help="with --vocoder real: the batched Perth pass too")
    p.add_argument("--setting", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a server setting for the run (repeatable)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.watermark and args.vocoder != "real":
        p.error("--watermark needs --vocoder real")
    if args.vocoder != "real" and str(dict(args.setting).get("vocoder_first_window_preempt", "")).lower() in ("1", "true"):
        p.error("vocoder_first_window_preempt stops a batch's CFM between its steps: the stand-in has no steps "
                "(--vocoder real)")
    device = None
    if args.vocoder == "real":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    else:
        torch.set_num_threads(1)
    rows = []
    for streams in [int(s) for s in args.streams.split(",") if s.strip()]:
        row = asyncio.run(measure(args.model, streams, args.seconds, args.t3_step_ms, args.vocoder_ms, args.tokens,
                                  device=device, watermark=args.watermark, overrides=dict(args.setting),
                                  stagger_s=args.stagger_s))
        print({k: v for k, v in row.items() if k != "first_error_trace"}, flush=True)
        if row["first_error_trace"]:
            print(row["first_error_trace"], file=sys.stderr, flush=True)
        rows.append(row)
    keys = [k for k in rows[0] if k != "first_error_trace"] if rows else []
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps({
            # the host's CPU, and with the real vocoder on a GPU that card too
            "card": cpu_card() + (f", {host_probes.card()}" if device and device.startswith("cuda") else ""),
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m gateway.tools.bench_engine_host " + " ".join(argv or sys.argv[1:]),
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
