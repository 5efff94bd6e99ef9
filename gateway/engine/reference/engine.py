"""The reference engine: upstream Chatterbox in PyTorch (T3, then S3Gen), one chunk at a time,
behind the :class:`~gateway.engine.base.Engine` interface, for every model family in the
``models`` setting: the original and Multilingual (Llama T3 with CFG, 10-step S3Gen with CFG),
Turbo (GPT-2 T3 without CFG, 2-step mean-flow S3Gen, three silence tokens appended as
upstream does).

It is the correctness baseline (the vLLM engine is checked against it on the same weights)
and the engine for CPU machines. One job at a time holds the model (a lock): upstream modules
are not batched here, and on CPU a second concurrent job would only halve both.

Cancellation: ``synthesize`` runs each chunk in a worker thread; when the consumer closes the
iterator or its task is cancelled, the job's stop event is set and the worker stops at the
next T3 decode step or the next S3Gen flow-matching step (a forward pre-hook inside the CFM
estimator), not at the end of the chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from gateway.engine.base import SAMPLE_RATE, AudioChunk, Engine, SynthesisJob, T3Request, T3Stats
from gateway.engine.checkpoint.upstream_voices import UpstreamVoices
from gateway.engine.chunk_edges import chunk_seed, fade_edges
from gateway.errors import EngineError, EngineUnavailableError, GatewayError, InvalidRequestError
from gateway.models.families import FAMILIES, TOP_K, Family
from gateway.settings import Settings


class ReferenceEngine(UpstreamVoices, Engine):
    name = "reference"
    sample_rate = SAMPLE_RATE

    def __init__(self, settings: Settings) -> None:
        from gateway.engine.checkpoint.weights import model_identity

        self.settings = settings
        self.models: tuple[str, ...] = tuple(settings.models)
        self.model_id = model_identity(settings, FAMILIES[self.models[0]])
        self.decode_steps = 0
        """T3 decode steps run so far (all jobs); tests use it to see that cancelling stops work."""
        self.flow_steps_run = 0
        """S3Gen flow-matching estimator calls so far (all jobs)."""
        self._components: dict[str, Any] | None = None
        self._model_lock = threading.Lock()
        self._active_stop: threading.Event | None = None
        self._live_jobs: set[threading.Event] = set()
        self._hooks: list[Any] = []
        self._t3_counts: dict[str, T3Stats] = {}
        """Per model, the counts behind :meth:`t3_stats`: each chunk's T3 call is a request
        (waiting for the model and its first step, decoding, ended with T3), changed from the
        event loop and the worker threads under ``_t3_lock``."""
        self._t3_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from gateway.engine.checkpoint.components import load_components, resolve_device
        from gateway.engine.checkpoint.weights import checkpoint_dir

        loaded: dict[str, Any] = {}
        for name in self.models:
            family = FAMILIES[name]
            directory = checkpoint_dir(self.settings, family)
            components = load_components(directory, resolve_device(self.settings.device), family)
            # Upstream calls estimator.forward() directly (no hooks fire there); its time MLP
            # is called through __call__ once per Euler step (twice for mean-flow: t and r).
            time_mlp = components.s3gen.flow.decoder.estimator.time_mlp
            self._hooks.append(time_mlp.register_forward_pre_hook(self._flow_step_hook))
            loaded[name] = components
        self._components = loaded

    async def close(self) -> None:
        components, self._components = self._components, None  # new jobs fail from here on
        for stop in list(self._live_jobs):
            stop.set()
        await asyncio.to_thread(self._release, components)

    def _release(self, components: Any) -> None:
        with self._model_lock:  # waits for the running chunk to notice its stop event
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
        if components and any(c.device.type == "cuda" for c in components.values()):
            import torch

            del components
            torch.cuda.empty_cache()

    @property
    def components(self) -> Any:
        """The first loaded family's upstream modules
        (:class:`~gateway.engine.checkpoint.components.Components`), e.g. for parity checks
        against another engine on the same weights; :meth:`components_of` for any family."""
        return self._ready()

    def components_of(self, model: str) -> Any:
        return self._components_for(model)

    def _ready(self) -> Any:
        return self._components_for(self.models[0])

    def _components_for(self, model: str) -> Any:
        if self._components is None:
            raise EngineUnavailableError("the reference engine is not loaded")
        components = self._components.get(model)
        if components is None:
            raise EngineError(f"the reference engine has not loaded the model {model}")
        return components

    # --- synthesis (voice and text methods come from UpstreamVoices) ----------------------

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        components = self._components_for(job.model)
        self._check_text(components, job)
        stop = threading.Event()
        self._live_jobs.add(stop)
        try:
            for index, text in enumerate(job.chunks):
                with self._t3_lock:
                    counted = self._t3_counts.setdefault(job.model, T3Stats()).request()
                try:
                    chunk = await asyncio.to_thread(self._render_chunk, components, job, index, text, stop, counted)
                except GatewayError:
                    raise
                except _Stopped:
                    raise EngineUnavailableError("the engine is shutting down") from None
                except Exception as exc:  # noqa: BLE001 - any model failure is the engine's, not the client's
                    raise EngineError(f"synthesis failed: {type(exc).__name__}: {exc}") from exc
                finally:  # T3 ended it already unless the chunk failed or was left (cancelled)
                    with self._t3_lock:
                        counted.end()
                yield chunk
        finally:
            # Reached on completion, on aclose() at a yield, and on task cancellation while a
            # worker runs (that worker keeps going until it sees this event).
            stop.set()
            self._live_jobs.discard(stop)

    def _check_text(self, components: Any, job: SynthesisJob) -> None:
        from gateway.engine.checkpoint.components import count_chunk_tokens, max_text_tokens

        limit = max_text_tokens(components.t3)
        for text in job.chunks:
            if count_chunk_tokens(components, text, job.language) > limit:
                raise InvalidRequestError(f"a text chunk exceeds the model's {limit} text tokens", param="input")

    def t3_stats(self) -> dict[str, T3Stats]:
        with self._t3_lock:
            return {model: dataclasses.replace(counts) for model, counts in self._t3_counts.items()}

    def _render_chunk(self, components: Any, job: SynthesisJob, index: int, text: str, stop: threading.Event,
                      counted: T3Request) -> AudioChunk:
        import torch

        from gateway.engine.checkpoint.components import chunk_text_ids, request_t3_cond
        from gateway.engine.reference.t3_decode import DecodeCancelled

        family: Family = components.family
        params = job.params
        trace = job.trace if index == 0 else None
        try:
            with self.holding_model(stop), torch.inference_mode(), _seeded(params.seed, index, components.device):
                if trace is not None:
                    trace.mark("reference: model lock held")
                tokens = self._speech_tokens(
                    components,
                    job,
                    request_t3_cond(job.voice.conditionals, params.exaggeration),
                    chunk_text_ids(components, text, job.language),
                    stop,
                    counted,
                )
                if tokens.numel() == 0:  # random weights can sample only special ids
                    return AudioChunk(samples=np.zeros(0, dtype=np.float32), speech_tokens=0)
                speech_tokens = int(tokens.numel())
                if trace is not None:
                    trace.mark(f"reference: t3 made {speech_tokens} tokens")
                if family.silence_tail_tokens:  # upstream Turbo ends every utterance on S3Gen silence
                    from chatterbox.models.s3gen.const import S3GEN_SIL

                    tail = torch.full((family.silence_tail_tokens,), S3GEN_SIL, dtype=tokens.dtype, device=tokens.device)
                    tokens = torch.cat([tokens, tail])
                wav, _ = components.s3gen.inference(
                    speech_tokens=tokens.to(components.device),
                    # upstream writes device casts back into the dict: keep the cached one intact
                    ref_dict=dict(job.voice.conditionals.gen),
                    n_cfm_timesteps=family.flow_steps or self.settings.flow_steps,
                )
        except DecodeCancelled:
            raise _Stopped from None
        samples = wav.squeeze(0).detach().to("cpu", torch.float32).numpy()
        if trace is not None:
            trace.mark("reference: s3gen done")
        if self.settings.watermark:
            samples = components.watermarker.apply_watermark(samples, sample_rate=SAMPLE_RATE)
            if trace is not None:
                trace.mark("reference: watermarked")
        samples = fade_edges(np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0))
        return AudioChunk(samples=samples, speech_tokens=speech_tokens)

    def _speech_tokens(self, components: Any, job: SynthesisJob, t3_cond: Any, text_ids: Any, stop: threading.Event,
                       counted: T3Request) -> Any:
        """The chunk's speech tokens for S3Gen (runs under the model lock, in the worker);
        ``counted`` gets a delivery per step and ends with T3."""
        from gateway.engine.reference.t3_decode import (
            Sampling,
            generate_speech_tokens,
            generate_turbo_tokens,
            turbo_speech_tokens,
            valid_speech_tokens,
        )

        family: Family = components.family
        params = job.params
        sampling = Sampling(
            cfg_weight=params.cfg_weight if family.cfg else 0.0,
            temperature=params.temperature,
            top_p=params.top_p,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            top_k=TOP_K.get(family.id, 0),
        )
        decode = generate_speech_tokens if family.cfg else generate_turbo_tokens

        def on_step(_step: int) -> None:  # one token a step
            self.decode_steps += 1
            with self._t3_lock:
                counted.delivered(1)

        try:
            raw = decode(
                components.t3,
                t3_cond,
                text_ids,
                sampling,
                max_new_tokens=min(params.max_speech_tokens, self.settings.max_speech_tokens),
                should_stop=stop.is_set,
                on_step=on_step,
            )
        finally:
            with self._t3_lock:
                counted.end()
        return valid_speech_tokens(raw) if family.cfg else turbo_speech_tokens(raw)

    @contextlib.contextmanager
    def holding_model(self, stop: threading.Event) -> Iterator[None]:
        """Hold the model for one piece of work (one chunk: T3 then S3Gen) that ``stop`` can
        cancel: T3 checks it before every step and S3Gen at every flow step (the hook below
        raises ``DecodeCancelled``). Raises ``_Stopped`` if ``stop`` was set while waiting."""
        with self._model_lock:
            if stop.is_set():
                raise _Stopped
            self._active_stop = stop
            try:
                yield
            finally:
                self._active_stop = None

    @property
    def busy(self) -> bool:
        """True while some job holds the model (a cancelled job's worker may still be finishing)."""
        return self._model_lock.locked()

    def _flow_step_hook(self, _module: Any, _args: Any) -> None:
        # Runs in the worker thread once per CFM estimator call (each Euler step).
        self.flow_steps_run += 1
        stop = self._active_stop
        if stop is not None and stop.is_set():
            from gateway.engine.reference.t3_decode import DecodeCancelled

            raise DecodeCancelled


class _Stopped(Exception):
    """The job's stop event was set while its chunk was waiting or running."""


@contextlib.contextmanager
def _seeded(seed: int | None, index: int, device: Any) -> Iterator[None]:
    """Seed torch's global RNG for one chunk (T3 sampling and S3Gen noise both draw from it),
    restoring it afterwards. Safe under the model lock: one chunk renders at a time."""
    if seed is None:
        yield
        return
    import torch

    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(chunk_seed(seed, index))
        yield
