"""The fast engine: T3 on vLLM (continuous batching, CUDA graphs) feeding batched vocoder
loops, for every model family in ``models``, on one GPU, behind the
:class:`~gateway.engine.base.Engine` interface.

Per loaded family (:class:`FamilyRuntime`): its upstream modules (voice encoder, S3Gen, text
front end; its T3 stays on the CPU, where the prompt half of it runs), its T3 front
(:mod:`~gateway.engine.vllm.t3.families`: prompt rows, decoding controls, limits), one vLLM
``AsyncLLM`` serving its T3 (the original and Multilingual both run the Llama plugin but
differ in text ids and weights; Turbo runs GPT-2: an engine each, its KV cache share from
:mod:`~gateway.engine.vllm.gpu_memory`), and one vocoder loop with the family's S3Gen and
solver (10-step CFM with CFG, or Turbo's 2-step mean-flow), on a worker thread of its own.
A job runs on the runtime of ``job.model``.

Per text chunk: the voice's prompt rows are computed once per voice and family on a worker
thread and cached (:class:`~gateway.engine.vllm.voice_rows.VoiceRowsCache`); the request's
share is added (the original's exaggeration row), the chunk's text ids come from the
family's front end (Multilingual: its language's, ``job.language``), and one vLLM request
streams speech token deltas (``RequestOutputKind.DELTA``) straight into a vocoder stream
(Turbo's three silence tokens follow its last one). The vocoder's windows come back as audio
chunks, each with the token count of its own window (watermarked when ``settings.watermark``:
a streamed utterance through :class:`~gateway.engine.vllm.watermark.StreamWatermark`, so it
agrees with watermarking the whole utterance once, as a one-shot one is; every stream's
windows go through one :class:`~gateway.engine.vllm.watermark_batch.WatermarkBatcher`, which
watermarks whatever is queued in one pass). Closing the
``synthesize`` iterator cancels the token task, which makes ``AsyncLLM.generate`` abort the
vLLM request, and cancels the vocoder stream.

Start (logged part by part, ``engine_start_part``, with seconds and GPU memory, then
``engine_start_summary``): every family's checkpoint and vLLM config first; the vLLM engines
then start side by side (each engine core is a process of its own, started with ``spawn``: a
fork after torch has used its CPU thread pool hangs the child) while this process loads the
families' modules; then each family's vocoder captures its CUDA graphs (only once the
engines are up: a capture must not meet other CUDA work of this process) and one short
request warms each family up, then waves of concurrent T3 requests have vLLM compile the
sampling kernel variants served batches will need (:mod:`~gateway.engine.vllm.t3.sampler_warmup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from gateway.engine.base import (SAMPLE_RATE, AudioChunk, BatchStats, Engine, GenerationParams, SynthesisJob, T3Stats,
                                 Voice)
from gateway.engine.checkpoint.upstream_voices import UpstreamVoices
from gateway.engine.chunk_edges import chunk_seed, fade_edges
from gateway.engine.vllm import gpu_serial
from gateway.engine.vllm.compile_caches import use_compile_caches
from gateway.engine.vllm.t3.delivery import regroup
from gateway.engine.vllm.t3.layout import MAX_POSITIONS
from gateway.engine.vllm.watermark import StreamWatermark
from gateway.engine.vllm.watermark_batch import WatermarkBatcher
from gateway.errors import EngineError, EngineUnavailableError, GatewayError, InvalidRequestError
from gateway.models.families import FAMILIES, Family
from gateway.observability.timeline import Timeline
from gateway.settings import Settings

SPEECH_VOCAB_SIZE = 6561
"""Speech token ids below this reach the vocoder (the stream drops T3's start/stop ids)."""

T3_DTYPE = "bfloat16"
"""The dtype vLLM serves T3 in; the prompt rows are sent in it too (``t3.prompt.embeds_for_vllm``)."""


@functools.cache
def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


@dataclasses.dataclass(slots=True)
class FamilyRuntime:
    """Everything one loaded family serves with (filled in as the engine starts)."""

    family: Family
    components: Any = None
    """Its upstream modules (``Components``); S3Gen and the voice encoder on the GPU."""
    t3: Any = None
    """Its T3 front (``t3.families.FamilyT3``)."""
    rows: Any = None
    """Its voice rows cache (``VoiceRowsCache``)."""
    llm: Any = None
    """Its vLLM ``AsyncLLM``."""
    vocoder: Any = None
    counts: T3Stats = dataclasses.field(default_factory=T3Stats)
    """Its T3 requests so far, kept by the token tasks (``VllmEngine.t3_stats`` copies it)."""


@dataclasses.dataclass(slots=True)
class _Generated:
    """Speech tokens T3 produced for one chunk so far (usage counts these, never the tail)."""

    tokens: int = 0


class VllmEngine(UpstreamVoices, Engine):
    name = "vllm"
    sample_rate = SAMPLE_RATE

    def __init__(self, settings: Settings, *, vllm_load_format: str = "safetensors") -> None:
        """``vllm_load_format="dummy"`` makes vLLM draw its own random T3 weights (benchmarks
        only: the CPU-side prompt rows then come from different random weights)."""
        from gateway.engine.checkpoint.weights import model_identity

        if settings.vllm_max_model_len > MAX_POSITIONS:
            raise ValueError(f"vllm_max_model_len is at most {MAX_POSITIONS} for the T3 model")
        self.settings = settings
        self.models: tuple[str, ...] = tuple(settings.models)
        self.model_id = model_identity(settings, FAMILIES[self.models[0]])
        self.vllm_load_format = vllm_load_format
        self.runtimes: dict[str, FamilyRuntime] = {name: FamilyRuntime(FAMILIES[name]) for name in self.models}
        self._loaded = False
        self.fixed_length = settings.fixed_speech_tokens
        """Benchmarks only: never stop before the token budget (random weights may sample the
        stop token; fixed lengths keep runs comparable)."""
        self.start_parts: list[dict[str, Any]] = []
        """What the start took, part by part (also logged)."""
        self._watermark: WatermarkBatcher | None = None
        """Every stream's Perth watermark, batched (one for all families: they share Perth)."""
        self._mark: Callable[..., Awaitable[np.ndarray]] | None = None
        """How a window is watermarked, ``(samples, first=...)`` with ``first`` for a stream's
        first window: the batcher's ``apply``, or upstream's call alone."""
        self._log = structlog.get_logger("gateway.engine")

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self._load)
            for runtime in self.runtimes.values():
                await runtime.vocoder.start()
            self._loaded = True
            for runtime in self.runtimes.values():
                with self._part(runtime.family.id, "warm_up"):
                    await self._warm_up(runtime)
        except BaseException:
            await self._shutdown()
            raise
        self._log_summary(time.perf_counter() - t0)

    def _load(self) -> None:
        import torch

        from gateway.engine.checkpoint.components import load_watermarker
        from gateway.engine.checkpoint.weights import checkpoint_dir
        from gateway.engine.vllm.gpu_memory import kv_cache_plan
        from gateway.engine.vllm.t3.families import kv_bytes_per_token
        from gateway.engine.vllm.t3.plugin import register

        self._log.info("compile_caches", **use_compile_caches(self.settings.cache_dir))  # before anything compiles
        if not torch.cuda.is_available():
            raise EngineUnavailableError("the vLLM engine needs a CUDA GPU")
        device = torch.device("cuda")
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        register()  # also registered by the entry point in vLLM's own processes
        _, total = torch.cuda.mem_get_info()
        kv_dtype = self.settings.vllm_kv_cache_dtype
        plan = kv_cache_plan(self.settings, {m: kv_bytes_per_token(FAMILIES[m], kv_dtype) for m in self.models}, total)
        self._log.info("vllm_kv_cache_plan", total_gpu_gib=round(total / 2**30, 1),
                       engines={m: share.describe() for m, share in plan.items()})
        directories: dict[str, Path] = {}
        configs: dict[str, Any] = {}
        for name in self.models:  # vLLM's configs one at a time; only the engines' starts overlap
            with self._part(name, "checkpoint"):
                directories[name] = checkpoint_dir(self.settings, FAMILIES[name])
                configs[name] = self._engine_config(FAMILIES[name], directories[name], plan[name].engine_kwargs())
        starting: dict[str, Future[Any]] = {}
        pool = ThreadPoolExecutor(max_workers=len(self.models), thread_name_prefix="vllm-start")
        try:
            for name in self.models:
                starting[name] = pool.submit(self._start_llm, name, configs[name])
                # an engine core in this process profiles this process's memory: nothing else
                # may allocate meanwhile
                if not self.settings.vllm_parallel_start or self.settings.vllm_engine_core == "thread":
                    self.runtimes[name].llm = starting[name].result()
            watermarker = load_watermarker(device)
            if self.settings.watermark_batch:
                self._watermark = WatermarkBatcher(watermarker, SAMPLE_RATE, serial=self.settings.gpu_serial_debug,
                                                   stream=self.settings.watermark_stream,
                                                   first_apart=self.settings.watermark_first_apart,
                                                   resample=self.settings.watermark_resample)
                self._mark = self._watermark.apply
            else:
                self._mark = functools.partial(_mark_alone, watermarker, serial=self.settings.gpu_serial_debug)
            for name in self.models:
                with self._part(name, "modules", gpu=True):
                    self._load_modules(self.runtimes[name], directories[name], device, watermarker)
            for name in self.models:
                self.runtimes[name].llm = starting[name].result()
            for name in self.models:  # graph capture: no other CUDA work in this process now
                with self._part(name, "vocoder", gpu=True) as part:
                    self._build_vocoder(self.runtimes[name], device)
                    batch = self.runtimes[name].vocoder.batch
                    cfm, enc, hift = batch.cfm, batch.encoder_graphs, batch.hift_graphs
                    if self.settings.vocoder_sms:
                        part.update(green_context_sms=self.settings.vocoder_sms)
                    part.update(cfm_graphs=len(cfm._graphs), cfm_graph_gib=round(cfm.graph_bytes / 2**30, 2),
                                encoder_graphs=len(enc.keys), hift_graphs=len(hift.keys),
                                encoder_hift_graph_gib=round((enc.graph_bytes + hift.graph_bytes) / 2**30, 2))
                    lane = self.runtimes[name].vocoder.first_lane
                    if lane is not None:  # vocoder_first_window_lane_rows: its own graphs, in a pool of their own
                        lb = lane.batch
                        part.update(first_lane_rows=lane.max_batch_rows, first_lane_cfm_graphs=len(lb.cfm._graphs),
                                    first_lane_graph_gib=round((lb.cfm.graph_bytes + lb.encoder_graphs.graph_bytes
                                                                + lb.hift_graphs.graph_bytes) / 2**30, 2))
        finally:
            pool.shutdown(wait=True)  # on a failure too: every engine that did start gets shut down
            for name, future in starting.items():
                if self.runtimes[name].llm is None and future.done() and future.exception() is None:
                    self.runtimes[name].llm = future.result()

    def _engine_config(self, family: Family, directory: Path, memory: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext

        from gateway.engine.vllm.t3.penalty_rows import engine_kwargs as penalty_engine_kwargs

        args = AsyncEngineArgs(
            model=str(self._model_dir(family, directory)), skip_tokenizer_init=True, enable_prompt_embeds=True,
            dtype=T3_DTYPE, load_format=self.vllm_load_format, max_model_len=self.settings.vllm_max_model_len,
            max_num_seqs=self.settings.vllm_max_num_seqs, enforce_eager=self.settings.vllm_enforce_eager,
            disable_log_stats=True, seed=self.settings.dummy_seed, stream_interval=self.settings.vllm_stream_interval,
            max_num_batched_tokens=self.settings.vllm_max_num_batched_tokens or None,
            disable_cascade_attn=not self.settings.vllm_cascade_attention,
            kv_cache_dtype=self.settings.vllm_kv_cache_dtype,
            **memory,
            **penalty_engine_kwargs(self.settings.vllm_penalty))
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT)  # as AsyncLLM.from_engine_args

    def _model_dir(self, family: Family, checkpoint: Path) -> Path:
        """The family's vLLM model directory, under the cache dir, named for its weights."""
        from gateway.engine.checkpoint.weights import model_identity
        from gateway.engine.vllm.t3.families import write_model_dir

        identity = model_identity(self.settings, family)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity)[:120]
        return write_model_dir(Path(self.settings.cache_dir) / "t3_vllm" / safe, family, checkpoint / family.t3_file)

    def _start_llm(self, name: str, config: Any) -> Any:
        """One vLLM engine, started and ready (its engine core a process, or with
        ``vllm_engine_core = "thread"`` a thread of this one). Runs on a thread of the start pool."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from gateway.engine.vllm.engine_thread import ThreadedLLM
        from gateway.engine.vllm.gpu_memory import engine_core_pids

        t0 = time.perf_counter()
        try:
            if self.settings.vllm_engine_core == "thread":
                llm = ThreadedLLM.from_vllm_config(config, priority=self.settings.vllm_engine_stream_priority)
            else:
                llm = AsyncLLM.from_vllm_config(config, disable_log_stats=True)
        except BaseException as exc:
            self._failed(name, "t3_engine", exc)
            raise
        self._record(name, "t3_engine", time.perf_counter() - t0, engine_pids=engine_core_pids(llm))
        return llm

    def _load_modules(self, runtime: FamilyRuntime, directory: Path, device: Any, watermarker: Any) -> None:
        from gateway.engine.checkpoint.components import load_components
        from gateway.engine.vllm.t3.families import family_t3
        from gateway.engine.vllm.voice_rows import VoiceRowsCache

        family = runtime.family
        # T3 stays on the CPU (vLLM holds the served copy): its conditioning half builds prompts.
        comps = load_components(directory, "cpu", family)
        comps.s3gen.to(device)
        comps.ve.to(device)
        builtin = comps.builtin_conditionals.to(device) if comps.builtin_conditionals is not None else None
        runtime.components = dataclasses.replace(comps, builtin_conditionals=builtin, device=device,
                                                 watermarker=watermarker)
        runtime.t3 = family_t3(family, comps.t3.state_dict())
        runtime.rows = VoiceRowsCache(runtime.t3.voice_rows, self.settings.voice_cache_size)

    def _build_vocoder(self, runtime: FamilyRuntime, device: Any) -> None:
        import torch

        from gateway.engine.vllm.engine_thread import ThreadedLLM
        from gateway.engine.vllm.t3_pause import T3Pause
        from gateway.engine.vllm.vocoder import Vocoder, with_own_flow

        runtime.vocoder = Vocoder(with_own_flow(runtime.components.s3gen), self.settings, device=device,
                                  flow_dtype=torch.bfloat16, flow_steps=runtime.family.flow_steps)
        if self.settings.t3_first_window_pause_ms > 0 and isinstance(runtime.llm, ThreadedLLM):
            runtime.vocoder.t3_pause = runtime.llm.pause = T3Pause(self.settings.t3_first_window_pause_ms / 1000)

    async def _warm_up(self, runtime: FamilyRuntime) -> None:
        """One short request through the family's T3 and vocoder (first-call costs stay out of
        requests)."""
        conds = runtime.components.builtin_conditionals
        if conds is None:
            return
        family = runtime.family
        params = GenerationParams(**family.defaults, max_speech_tokens=30, seed=0)
        language = "en" if "en" in family.languages else family.languages[0]
        job = SynthesisJob("warm-up", ("Warm up.",), Voice("builtin", "builtin", conds), params,
                           model=family.id, language=language, streaming=True)
        async for _ in self.synthesize(job):
            pass
        with self._part(family.id, "warm_up_sampler") as extra:
            extra["waves"] = await self._warm_up_sampler(runtime, job)

    async def _warm_up_sampler(self, runtime: FamilyRuntime, job: SynthesisJob) -> list[str]:
        """Waves of concurrent fixed-length T3 requests, one per sampling-kernel variant this
        family's requests can need (``t3.sampler_warmup``), so that vLLM compiles them now;
        T3 alone (no vocoder). Returns the waves run, as ``"<rows>x top_p=<p>"``."""
        from gateway.engine.vllm.t3 import sampler_warmup

        family = runtime.family
        rows = sampler_warmup.warm_rows(self.settings.vllm_max_num_seqs)
        if not rows:
            return []

        def sampling_for(top_p: float) -> Any:
            params = GenerationParams(**{**family.defaults, "top_p": top_p})
            return runtime.t3.sampling(params, max_tokens=sampler_warmup.WARM_TOKENS, seed=None, fixed_length=True)

        variants = sampler_warmup.warm_variants(sampling_for, GenerationParams(**family.defaults).top_p)
        if not variants:
            return []
        prompt = (await self._prompt(runtime, job, job.chunks[0])).vllm_prompt(_torch_dtype(T3_DTYPE))

        async def drain(sampling: Any) -> None:
            # each request its own lists (an in-process engine core keeps what it is given)
            own = {**prompt, "prompt_token_ids": list(prompt["prompt_token_ids"]),
                   "prompt_is_token_ids": list(prompt["prompt_is_token_ids"])}
            async for _ in runtime.llm.generate(own, sampling.to_vllm(), f"warm-up-sampler-{uuid.uuid4().hex[:8]}"):
                pass

        waves = []
        for top_p, sampling in variants:
            for n in rows:
                await asyncio.gather(*(drain(sampling) for _ in range(n)))
                waves.append(f"{n}x top_p={top_p}")
        return waves

    # --- the start log -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _part(self, family: str, part: str, *, gpu: bool = False) -> Iterator[dict[str, Any]]:
        """Time one part of the start; ``gpu``: also the GPU memory this process took for it
        (the part runs alone in this process: vLLM's engines are processes of their own)."""
        from gateway.engine.vllm.gpu_memory import process_reserved

        extra: dict[str, Any] = {}
        before = process_reserved() if gpu else 0
        t0 = time.perf_counter()
        try:
            yield extra
        except BaseException as exc:
            self._failed(family, part, exc)
            raise
        if gpu:
            extra["gpu_gib"] = round((process_reserved() - before) / 2**30, 2)
        self._record(family, part, time.perf_counter() - t0, **extra)

    def _failed(self, family: str, part: str, exc: BaseException) -> None:
        """Name the family and part a failed start failed in (the error alone may not)."""
        self._log.error("engine_start_failed", family=family, part=part, error=f"{type(exc).__name__}: {exc}"[:2000])

    def _record(self, family: str, part: str, seconds: float, **extra: Any) -> None:
        entry = {"family": family, "part": part, "seconds": round(seconds, 1), **extra}
        self.start_parts.append(entry)
        self._log.info("engine_start_part", **entry)

    def _log_summary(self, seconds: float) -> None:
        from gateway.engine.vllm.gpu_memory import device_memory, engine_core_pids, gpu_memory_by_pid, process_reserved

        used, total = device_memory()
        by_pid = gpu_memory_by_pid()
        engines = {}
        for name, runtime in self.runtimes.items():
            pids = engine_core_pids(runtime.llm)
            engines[name] = {"pids": pids, "gpu_gib": round(sum(by_pid.get(p, 0) for p in pids) / 2**30, 2)
                             if by_pid else None}
        self._log.info("engine_start_summary", seconds=round(seconds, 1), gpu_used_gib=round(used / 2**30, 2),
                       gpu_total_gib=round(total / 2**30, 1), this_process_gib=round(process_reserved() / 2**30, 2),
                       this_process_device_gib=round(by_pid.get(os.getpid(), 0) / 2**30, 2) if by_pid else None,
                       vllm_engines=engines)

    # --- lifecycle (cont.) -------------------------------------------------------------------

    async def close(self) -> None:
        await self._shutdown()

    async def check_health(self) -> None:
        """Raise when a vLLM engine core process has died (``AsyncLLM.check_health`` raises
        ``EngineDeadError``) or a vocoder cannot serve (its loop died, or its batches keep
        failing); ``gateway.server.engine_watch`` then marks the server not ready."""
        for runtime in self.runtimes.values():
            if runtime.llm is not None:
                await runtime.llm.check_health()
            if runtime.vocoder is not None and self._loaded:
                runtime.vocoder.check_health()

    def batch_stats(self) -> BatchStats | None:
        """The vocoder loops' counters, all families together (one batched S3Gen call per
        tick of a loop, all streams of its family)."""
        vocoders = [r.vocoder for r in self.runtimes.values() if r.vocoder is not None]
        if not vocoders:
            return None
        histogram: dict[int, int] = {}
        for vocoder in vocoders:
            for rows, count in vocoder.stats.rows_per_batch.items():
                histogram[rows] = histogram.get(rows, 0) + count
        stats = [v.stats for v in vocoders]
        return BatchStats(batches=sum(s.batches for s in stats), rows=sum(s.rows for s in stats),
                          rows_dropped=sum(s.windows_dropped for s in stats), busy_s=sum(s.busy_s for s in stats),
                          audio_s=sum(s.audio_s for s in stats), rows_per_batch=histogram,
                          flow_frames=sum(s.flow_frames for s in stats),
                          whole_windows=sum(s.whole_windows for s in stats),
                          cfm_frames=sum(s.cfm_frames for s in stats),
                          cfm_solved_frames=sum(s.cfm_solved_frames for s in stats),
                          cfm_eager_frames=sum(s.cfm_eager_frames for s in stats),
                          hift_frames=sum(s.hift_frames for s in stats),
                          hift_eager_frames=sum(s.hift_eager_frames for s in stats),
                          device_busy_s=sum(s.device_busy_s for s in stats),
                          t3_pauses=sum(v.t3_pause.holds for v in vocoders if v.t3_pause is not None),
                          t3_paused_s=sum(v.t3_pause.held_s for v in vocoders if v.t3_pause is not None),
                          **self._t3_step_counters(), **self._watermark_counters())

    def _t3_step_counters(self) -> dict[str, Any]:
        """The engine threads' step clocks (each ThreadedLLM once, whichever families share it)."""
        from gateway.engine.vllm.engine_thread import ThreadedLLM

        clocks = {id(r.llm): r.llm.clock for r in self.runtimes.values() if isinstance(r.llm, ThreadedLLM)}
        if not clocks:
            return {}
        return {"t3_steps": sum(c.steps for c in clocks.values()), "t3_step_s": sum(c.wall_s for c in clocks.values()),
                "t3_step_cpu_s": sum(c.cpu_s for c in clocks.values())}

    def _watermark_counters(self) -> dict[str, Any]:
        marker = self._watermark
        if marker is None:
            return {}
        return {"watermark_passes": marker.batches, "watermark_rows": marker.rows, "watermark_busy_s": marker.busy_s}

    def t3_stats(self) -> dict[str, T3Stats]:
        """Each loaded family's T3 requests: waiting for their first token (vLLM's queue and
        prefill), decoding, and the tokens delivered (counted where the engine takes them)."""
        return {name: dataclasses.replace(runtime.counts) for name, runtime in self.runtimes.items()}

    async def _shutdown(self) -> None:
        self._loaded = False  # new jobs fail from here on
        for runtime in self.runtimes.values():
            if runtime.vocoder is not None:
                await runtime.vocoder.close()
        for runtime in self.runtimes.values():
            if runtime.llm is not None:
                llm, runtime.llm = runtime.llm, None
                # On the loop thread: shutdown() cancels AsyncLLM's output task before the engine
                # process stops (from another thread the task sees a dead engine and logs an error).
                llm.shutdown()
        if self._watermark is not None:  # after the vocoders: no stream is left to call it
            watermark, self._watermark = self._watermark, None
            await asyncio.to_thread(watermark.close)

    def _runtime(self, model: str) -> FamilyRuntime:
        runtime = self.runtimes.get(model)
        if runtime is None:
            raise EngineError(f"the vLLM engine has not loaded the model {model}")
        if not self._loaded or runtime.llm is None or runtime.components is None:
            raise EngineUnavailableError("the vLLM engine is not loaded")
        return runtime

    def _ready(self) -> Any:
        return self._runtime(self.models[0]).components

    def _components_for(self, model: str) -> Any:
        return self._runtime(model).components

    @property
    def components(self) -> Any:
        """The first loaded family's modules (``Components``); :meth:`components_of` for any."""
        return self._ready()

    def components_of(self, model: str) -> Any:
        return self._components_for(model)

    # --- text limits (voice and text methods come from UpstreamVoices) --------------------

    def max_text_tokens(self, model: str | None = None) -> int:
        """Most text tokens one chunk of ``model`` (default: the first loaded) may have."""
        runtime = self._runtime(model or self.models[0])
        return runtime.t3.max_text_tokens(self.settings.vllm_max_model_len)

    # --- synthesis -----------------------------------------------------------------------

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        from gateway.engine.checkpoint.components import count_chunk_tokens

        runtime = self._runtime(job.model)
        limit = self.max_text_tokens(job.model)
        for text in job.chunks:
            if count_chunk_tokens(runtime.components, text, job.language) > limit:
                raise InvalidRequestError(f"a text chunk exceeds the model's {limit} text tokens", param="input")
        for index, text in enumerate(job.chunks):
            # aclosing: closing this iterator must close the chunk's at once (abort, cancel)
            async with contextlib.aclosing(self._chunk(runtime, job, index, text)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _prompt(self, runtime: FamilyRuntime, job: SynthesisJob, text: str, trace: Timeline | None = None) -> Any:
        """The chunk's T3 prompt: the voice's cached rows, the request's share, the text ids
        of the family's front end in the job's language (each part marked on ``trace``: the
        server's first-audio timeline spent 3.6-6.6 ms here on an H100, 0.3 on a CPU alone)."""
        from gateway.engine.checkpoint.components import chunk_text_ids

        text_ids = chunk_text_ids(runtime.components, text, job.language)[0].tolist()
        if trace is not None:
            trace.mark("t3 text ids")
        voice_rows = await runtime.rows.get(job.voice.key, job.voice.conditionals)
        if trace is not None:
            trace.mark("t3 voice rows")
        return runtime.t3.prompt(runtime.t3.request_rows(voice_rows, job.params), text_ids, job.params)

    def _sampling(self, runtime: FamilyRuntime, job: SynthesisJob, index: int, prompt_rows: int) -> Any:
        """The chunk's decoding controls (``t3.families.T3Sampling``)."""
        p = job.params
        room = self.settings.vllm_max_model_len - prompt_rows
        if room < 1:
            raise InvalidRequestError("a text chunk is too long for the model's context", param="input")
        max_tokens = min(p.max_speech_tokens, self.settings.max_speech_tokens, room)
        seed = None if p.seed is None else chunk_seed(p.seed, index)
        sampling = runtime.t3.sampling(p, max_tokens=max_tokens, seed=seed, fixed_length=self.fixed_length)
        return dataclasses.replace(sampling, penalty_path=self.settings.vllm_penalty)

    async def _chunk(self, runtime: FamilyRuntime, job: SynthesisJob, index: int, text: str) -> AsyncIterator[AudioChunk]:
        trace = job.trace if index == 0 else None  # the first audio comes from the first chunk
        prompt = await self._prompt(runtime, job, text, trace)
        if trace is not None:
            trace.mark("t3 prompt rows")
        sampling = self._sampling(runtime, job, index, len(prompt.token_ids))
        stream = runtime.vocoder.open_stream(job.voice.key, job.voice.conditionals.gen, one_shot=not job.streaming,
                                             trace=trace)
        request_id = f"{job.request_id}-{index}-{uuid.uuid4().hex[:8]}"
        if trace is not None:
            trace.mark("t3 prompt built")
        generated = _Generated()
        producer = asyncio.create_task(self._tokens(runtime, prompt.vllm_prompt(_torch_dtype(T3_DTYPE)), sampling,
                                                    request_id, stream, generated, trace))
        made = 0
        first = True
        marker = None
        if self.settings.watermark and not stream.one_shot:  # one-shot: one watermark pass, as upstream
            def mark(buf: np.ndarray) -> Awaitable[np.ndarray]:
                return self._mark(buf, first=first)  # ``first`` read at the call: no audio out yet

            marker = StreamWatermark(None, SAMPLE_RATE, apply_async=mark)
        try:
            async for samples, vocoded in stream.chunks():
                if self.settings.watermark:
                    marking = marker.push_async(samples) if marker is not None else self._mark(samples, first=first)
                    samples = await _marked(marking)
                samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
                if not samples.size:
                    continue  # all held back by the watermark: its tokens count with the next chunk
                if first and trace is not None:
                    trace.mark("watermarked" if self.settings.watermark else "clipped")
                if stream.one_shot:
                    samples = fade_edges(samples)
                elif first:  # chunks of a job meet at silence, as the reference engine's do
                    samples = fade_edges(samples, fade_out=False)
                first = False
                counted = min(vocoded, generated.tokens)  # a tail (Turbo's silence) is no speech token
                yield AudioChunk(samples=samples, speech_tokens=counted - made)
                made = counted
            if marker is not None:
                rest = np.clip(await _marked(marker.flush_async()), -1.0, 1.0)
                counted = min(stream.tokens_vocoded, generated.tokens)
                if rest.size or made != counted:
                    yield AudioChunk(samples=fade_edges(rest, fade_out=False) if first else rest,
                                     speech_tokens=counted - made)
            await producer  # surfaces a T3 failure that ended the stream early
        finally:
            if not producer.done():
                producer.cancel()  # AsyncLLM.generate aborts the vLLM request on cancellation
                try:
                    await producer
                except BaseException:  # noqa: BLE001 - the cancellation we asked for, or its cause
                    pass
            stream.cancel()

    async def _tokens(self, runtime: FamilyRuntime, prompt: dict, sampling: Any, request_id: str, stream: Any,
                      generated: _Generated, trace: Timeline | None = None) -> None:
        """Speech token deltas from vLLM into the vocoder stream, then the family's tail
        tokens (after any speech), then ``finish``. ``trace``: the request's timeline, handed
        to an engine thread (``vllm_engine_core = "thread"``) to mark vLLM's part."""
        counted = runtime.counts.request()
        cap = self.settings.vllm_stream_interval
        # groups of up to cap tokens, each ending where the stream's next window is due
        outputs = getattr(runtime.llm, "output_processor", None) if cap > 1 else None
        traced = {"trace": trace} if trace is not None and _marks_timelines(runtime.llm) else {}
        try:
            async for out in runtime.llm.generate(prompt, sampling.to_vllm(), request_id, **traced):
                ids = out.outputs[0].token_ids
                made = sum(1 for t in ids if 0 <= t < SPEECH_VOCAB_SIZE)
                generated.tokens += made
                counted.delivered(made)
                stream.push(ids)
                if outputs is not None and not out.finished:
                    regroup(outputs, request_id, stream.tokens_wanted(), cap)
            if generated.tokens and runtime.t3.tail_tokens:
                stream.push(runtime.t3.tail_tokens)
            stream.finish()
        except asyncio.CancelledError:
            raise
        except GatewayError:
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - a vLLM failure is the engine's, not the client's
            stream.cancel()
            raise EngineError(f"T3 generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            counted.end()


def _marks_timelines(llm: Any) -> bool:
    """Whether ``llm`` marks a request's timeline itself (the engine thread does; AsyncLLM,
    whose engine core is a process, does not)."""
    from gateway.engine.vllm.engine_thread import ThreadedLLM

    return isinstance(llm, ThreadedLLM)


async def _marked(marking: Awaitable[np.ndarray]) -> np.ndarray:
    """A watermark pass's samples. Its failure is the engine's (a device fault, say): an
    ``EngineError``, as a vocoder's is, not an unhandled exception."""
    try:
        return await marking
    except (GatewayError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - a watermark failure is the engine's, not the client's
        raise EngineError(f"the watermark pass failed: {type(exc).__name__}: {exc}") from exc


async def _mark_alone(watermarker: Any, samples: np.ndarray, *, first: bool = False, serial: bool = False) -> np.ndarray:
    """Upstream's watermark of one window, on a worker thread (``watermark_batch`` off; each
    window alone, so ``first`` changes nothing)."""
    def mark() -> np.ndarray:
        with gpu_serial.serial(serial, "watermark"):
            return watermarker.apply_watermark(samples, sample_rate=SAMPLE_RATE)

    return await asyncio.to_thread(mark)
