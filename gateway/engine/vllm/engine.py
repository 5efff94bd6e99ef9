"""The fast engine: T3 on vLLM (continuous batching, CUDA graphs, CFG inside each sequence)
feeding the shared batched vocoder loop, behind the :class:`~gateway.engine.base.Engine`
interface.

Per text chunk: the prompt rows are built on the CPU (``t3.prompt``; the voice's
conditioning rows, i.e. the Perceiver's work, are computed once per voice on a worker thread
and cached per voice; the request's exaggeration sets one row), one vLLM request streams
speech token deltas (``RequestOutputKind.DELTA``) straight into a vocoder stream, and the
vocoder's windows come back as audio chunks, each with the token count of its own window
(watermarked when ``settings.watermark``: a streamed utterance through
:class:`~gateway.engine.vllm.watermark.StreamWatermark`, so it agrees with watermarking the
whole utterance once, as a one-shot one is). Closing the
``synthesize`` iterator cancels the token task, which makes ``AsyncLLM.generate`` abort the
vLLM request, and cancels the vocoder stream.

vLLM runs in-process as ``AsyncLLM`` (its engine core is a child process, started with
``spawn``: a fork after torch has used its CPU thread pool hangs the child). The KV cache is
bounded by ``vllm_kv_cache_memory_bytes`` (or ``vllm_gpu_memory_utilization``) so S3Gen,
the voice encoder and the watermarker keep their share of the same GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from gateway.engine.base import SAMPLE_RATE, AudioChunk, BatchStats, Engine, SynthesisJob
from gateway.engine.checkpoint.upstream_voices import UpstreamVoices
from gateway.engine.chunk_edges import chunk_seed, fade_edges
from gateway.engine.vllm.t3.layout import MAX_POSITIONS, MAX_PROMPT, STOP_SPEECH, cfg_code
from gateway.engine.vllm.watermark import StreamWatermark
from gateway.errors import EngineError, EngineUnavailableError, GatewayError, InvalidRequestError
from gateway.models.families import ORIGINAL
from gateway.settings import Settings


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
        self.models: tuple[str, ...] = (ORIGINAL,)
        """Turbo and Multilingual run on the reference engine so far (docs/models.md)."""
        self.model_id = model_identity(settings)
        self.vllm_load_format = vllm_load_format
        self.llm: Any = None
        self.vocoder: Any = None
        self._components: Any = None
        self._builder: Any = None
        self._cond_cache: OrderedDict[str, Any] = OrderedDict()
        """Voice key -> the voice's conditioning rows (Perceiver output; no exaggeration row)."""
        self._cond_pending: dict[str, asyncio.Future[Any]] = {}
        self.fixed_length = settings.fixed_speech_tokens
        """Benchmarks only: never stop before the token budget (random weights may sample the
        stop token; fixed lengths keep runs comparable)."""

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
            await self.vocoder.start()
            await self._warm_up()
        except BaseException:
            await self._shutdown()
            raise

    def _load(self) -> None:
        import perth
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from gateway.engine.checkpoint.components import load_components
        from gateway.engine.vllm.t3.plugin import register
        from gateway.engine.vllm.t3.prompt import T3PromptBuilder
        from gateway.engine.vllm.vocoder import Vocoder, with_own_flow
        from gateway.engine.checkpoint.weights import checkpoint_dir

        if not torch.cuda.is_available():
            raise EngineUnavailableError("the vLLM engine needs a CUDA GPU")
        device = torch.device("cuda")
        directory = checkpoint_dir(self.settings)
        # T3 stays on the CPU (vLLM holds the served copy): its conditioning half builds prompts.
        comps = load_components(directory, "cpu")
        comps.s3gen.to(device)
        comps.ve.to(device)
        builtin = comps.builtin_conditionals.to(device) if comps.builtin_conditionals is not None else None
        self._components = dataclasses.replace(
            comps, builtin_conditionals=builtin, device=device,
            watermarker=perth.PerthImplicitWatermarker(device=str(device)))
        self._builder = T3PromptBuilder.from_state_dict(comps.t3.state_dict(), comps.t3.hp)

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        register()  # also registered by the entry point in vLLM's own processes
        model_dir = self._model_dir(directory)
        memory: dict[str, Any] = {"gpu_memory_utilization": self.settings.vllm_gpu_memory_utilization}
        if self.settings.vllm_kv_cache_memory_bytes:
            memory = {"kv_cache_memory_bytes": self.settings.vllm_kv_cache_memory_bytes}
        args = AsyncEngineArgs(
            model=str(model_dir), skip_tokenizer_init=True, enable_prompt_embeds=True, dtype="bfloat16",
            load_format=self.vllm_load_format, max_model_len=self.settings.vllm_max_model_len,
            max_num_seqs=self.settings.vllm_max_num_seqs, enforce_eager=self.settings.vllm_enforce_eager,
            disable_log_stats=True, seed=self.settings.dummy_seed, **memory)
        self.llm = AsyncLLM.from_engine_args(args)
        self.vocoder = Vocoder(with_own_flow(comps.s3gen), self.settings, device=device, flow_dtype=torch.bfloat16)

    def _model_dir(self, checkpoint: Path) -> Path:
        """A directory vLLM can load: our config.json and the checkpoint's T3 weights (a link:
        the checkpoint directory also holds S3Gen/VE files vLLM must not read)."""
        from gateway.engine.vllm.t3.config import write_model_dir

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_id)[:120]
        model_dir = write_model_dir(Path(self.settings.cache_dir) / "t3_vllm" / safe,
                                    max_speech_tokens=self._builder.hp.max_speech_tokens,
                                    max_text_tokens=self._builder.hp.max_text_tokens,
                                    text_vocab_size=self._builder.hp.text_tokens_dict_size)
        link = model_dir / "model.safetensors"
        target = (checkpoint / "t3_cfg.safetensors").resolve()
        if link.is_symlink() or link.exists():
            if link.resolve() == target:
                return model_dir
            link.unlink()
        link.symlink_to(target)
        return model_dir

    async def _warm_up(self) -> None:
        """One short request through T3 and the vocoder (first-call costs stay out of requests)."""
        from gateway.engine.base import GenerationParams, Voice

        conds = self._components.builtin_conditionals
        if conds is None:
            return
        job = SynthesisJob("warm-up", ("Warm up.",), Voice("builtin", "builtin", conds),
                           GenerationParams(max_speech_tokens=30, seed=0), streaming=True)
        async for _ in self.synthesize(job):
            pass

    async def close(self) -> None:
        await self._shutdown()

    async def check_health(self) -> None:
        """Raise when vLLM's engine core process has died (``AsyncLLM.check_health`` raises
        ``EngineDeadError``) or the vocoder cannot serve (its loop died, or its batches keep
        failing); ``gateway.server.engine_watch`` then marks the server not ready."""
        if self.llm is not None:
            await self.llm.check_health()
        if self.vocoder is not None and self._components is not None:
            self.vocoder.check_health()

    def batch_stats(self) -> BatchStats | None:
        """The vocoder loop's counters (one batched S3Gen call per tick, all streams)."""
        if self.vocoder is None:
            return None
        stats = self.vocoder.stats
        return BatchStats(batches=stats.batches, rows=stats.rows, rows_dropped=stats.windows_dropped,
                          busy_s=stats.busy_s, audio_s=stats.audio_s, rows_per_batch=dict(stats.rows_per_batch),
                          device_busy_s=stats.device_busy_s)

    async def _shutdown(self) -> None:
        self._components = None  # new jobs fail from here on
        if self.vocoder is not None:
            await self.vocoder.close()
        if self.llm is not None:
            llm, self.llm = self.llm, None
            # On the loop thread: shutdown() cancels AsyncLLM's output task before the engine
            # process stops (from another thread the task sees a dead engine and logs an error).
            llm.shutdown()

    def _ready(self) -> Any:
        if self._components is None or self.llm is None:
            raise EngineUnavailableError("the vLLM engine is not loaded")
        return self._components

    @property
    def components(self) -> Any:
        return self._ready()

    # --- text limits (voice and text methods come from UpstreamVoices) --------------------

    def max_text_tokens(self) -> int:
        """Most text tokens one chunk may have: T3's text positions, and the prompt side
        channel's row budget (conditioning + start/stop text + two start-of-speech rows)."""
        from gateway.engine.checkpoint.components import max_text_tokens

        return min(max_text_tokens(self._ready().t3), MAX_PROMPT - 1 - self._builder.cond_rows - 4)

    # --- synthesis -----------------------------------------------------------------------

    async def _conditioning(self, job: SynthesisJob) -> Any:
        """The job's conditioning rows. The voice's part (Perceiver over its prompt, ~the
        only CPU-heavy step) is cached per voice and computed on a worker thread, once per
        voice however many requests wait for it; the exaggeration is a single row added per
        request, so no request parameter can make the cache miss."""
        key = job.voice.key
        rows = self._cond_cache.get(key)
        if rows is None:
            pending = self._cond_pending.get(key)
            if pending is None:
                from gateway.engine.checkpoint.components import request_t3_cond

                cond = request_t3_cond(job.voice.conditionals, 0.0)
                pending = asyncio.ensure_future(asyncio.to_thread(self._builder.voice_rows, cond))
                self._cond_pending[key] = pending
                pending.add_done_callback(lambda _f, k=key: self._cond_pending.pop(k, None))
            rows = await asyncio.shield(pending)  # one waiter's cancellation spares the others
            self._cond_cache[key] = rows
            while len(self._cond_cache) > self.settings.voice_cache_size:
                self._cond_cache.popitem(last=False)
        else:
            self._cond_cache.move_to_end(key)
        return self._builder.with_exaggeration(rows, job.params.exaggeration)

    async def _prompt(self, job: SynthesisJob, text_tokens: list[int]) -> Any:
        """The chunk's vLLM prompt (rows + side-channel ids carrying ``cfg_weight``)."""
        rows = await self._conditioning(job)
        try:
            cfg_code(job.params.cfg_weight)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="cfg_weight") from None
        if rows.shape[0] + len(text_tokens) + 2 >= MAX_PROMPT:
            raise InvalidRequestError(f"a text chunk is too long for the model's prompt ({MAX_PROMPT - 1} rows)",
                                      param="input")
        try:
            return self._builder.build(rows, text_tokens, job.params.cfg_weight)
        except ValueError as exc:  # anything else is ours (ids, rows), not the client's
            raise EngineError(f"could not build the T3 prompt: {exc}") from exc

    def _sampling(self, job: SynthesisJob, index: int, prompt_rows: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = job.params
        room = self.settings.vllm_max_model_len - prompt_rows
        if room < 1:
            raise InvalidRequestError("a text chunk is too long for the model's context", param="input")
        max_tokens = min(p.max_speech_tokens, self.settings.max_speech_tokens, room)
        return SamplingParams(
            min_tokens=max_tokens if self.fixed_length else 0,
            temperature=p.temperature, top_p=p.top_p, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
            seed=None if p.seed is None else chunk_seed(p.seed, index),
            max_tokens=max_tokens,
            stop_token_ids=[STOP_SPEECH], detokenize=False, skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA)

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        components = self._ready()
        limit = self.max_text_tokens()
        for text in job.chunks:
            if self.count_text_tokens(text) > limit:
                raise InvalidRequestError(f"a text chunk exceeds the model's {limit} text tokens", param="input")
        for index, text in enumerate(job.chunks):
            # aclosing: closing this iterator must close the chunk's at once (abort, cancel)
            async with contextlib.aclosing(self._chunk(components, job, index, text)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _chunk(self, components: Any, job: SynthesisJob, index: int, text: str) -> AsyncIterator[AudioChunk]:
        from gateway.engine.checkpoint.components import text_token_ids

        trace = job.trace if index == 0 else None  # the first audio comes from the first chunk
        prompt = await self._prompt(job, text_token_ids(components.tokenizer, components.t3, text)[0].tolist())
        sampling = self._sampling(job, index, len(prompt.token_ids))
        stream = self.vocoder.open_stream(job.voice.key, job.voice.conditionals.gen, one_shot=not job.streaming,
                                          trace=trace)
        request_id = f"{job.request_id}-{index}-{uuid.uuid4().hex[:8]}"
        if trace is not None:
            trace.mark("t3 prompt built")
        producer = asyncio.create_task(self._tokens(prompt.vllm_prompt(), sampling, request_id, stream))
        made = 0
        first = True
        marker = None
        if self.settings.watermark and not stream.one_shot:  # one-shot: one watermark pass, as upstream
            marker = StreamWatermark(functools.partial(components.watermarker.apply_watermark,
                                                       sample_rate=SAMPLE_RATE), SAMPLE_RATE)
        try:
            async for samples, vocoded in stream.chunks():
                if marker is not None:
                    samples = await asyncio.to_thread(marker.push, samples)
                elif self.settings.watermark:
                    samples = await asyncio.to_thread(
                        components.watermarker.apply_watermark, samples, sample_rate=SAMPLE_RATE)
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
                yield AudioChunk(samples=samples, speech_tokens=vocoded - made)
                made = vocoded
            if marker is not None:
                rest = np.clip(await asyncio.to_thread(marker.flush), -1.0, 1.0)
                if rest.size or made != stream.tokens_vocoded:
                    yield AudioChunk(samples=fade_edges(rest, fade_out=False) if first else rest,
                                     speech_tokens=stream.tokens_vocoded - made)
            await producer  # surfaces a T3 failure that ended the stream early
        finally:
            if not producer.done():
                producer.cancel()  # AsyncLLM.generate aborts the vLLM request on cancellation
                try:
                    await producer
                except BaseException:  # noqa: BLE001 - the cancellation we asked for, or its cause
                    pass
            stream.cancel()

    async def _tokens(self, prompt: dict, sampling: Any, request_id: str, stream: Any) -> None:
        """Speech token deltas from vLLM into the vocoder stream, then ``finish``."""
        try:
            async for out in self.llm.generate(prompt, sampling, request_id):
                stream.push(out.outputs[0].token_ids)
            stream.finish()
        except asyncio.CancelledError:
            raise
        except GatewayError:
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - a vLLM failure is the engine's, not the client's
            stream.cancel()
            raise EngineError(f"T3 generation failed: {type(exc).__name__}: {exc}") from exc
