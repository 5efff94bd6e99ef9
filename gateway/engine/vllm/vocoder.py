"""One vocoder loop for every stream: S3Gen run on batches of token windows.

What an engine calls (event-loop thread only)::

    vocoder = Vocoder(s3gen, settings, device="cuda", flow_dtype=torch.bfloat16)
    await vocoder.start()
    stream = vocoder.open_stream(voice.key, ref_dict)   # ref_dict = Conditionals.gen
    stream.push([1234, 87, ...])      # speech tokens as T3 yields them (ids >= 6561 dropped)
    stream.finish()                   # no more tokens: the tail is flushed (finalize=True)
    async for samples in stream.audio():   # float32 numpy arrays, 24 kHz, in order
        ...
    stream.cancel()                   # or close the audio() iterator: pending windows dropped
    samples = await vocoder.vocode(voice.key, ref_dict, tokens)  # whole utterance, one window
    await vocoder.close()

``open_stream(..., one_shot=True)`` vocodes the whole utterance as one window once it is
finished (non-streaming requests: identical to upstream ``S3Gen.inference`` given the same
noise, still batched with other streams). Otherwise the stream is cut into windows by
:mod:`gateway.engine.vllm.vocoder_windows` (a small first window for a fast first byte, then
larger ones, joined by left context, lookahead and a crossfade).

One asyncio task collects the ready windows of ALL streams (first windows first, then the
longest-waiting), up to ``settings.vocoder_max_batch`` rows and ``max_batch_tokens`` padded
flow tokens, and runs them as one batch (:class:`gateway.engine.vllm.s3gen_batch.S3GenBatch`) on a
dedicated worker thread (torch releases the GIL). A stream has at most one window in flight;
a cancelled stream's results are dropped. A stream whose reference dict cannot be prepared
fails alone (``EngineError`` from ``audio()``); a batch that fails fails its streams and the
loop keeps serving.
``Vocoder.stats`` counts batches and rows for the metrics layer; ``on_batch`` is called with
each batch's row count, padded tokens and seconds. The engine still applies the watermark
(``settings.watermark``) to what ``audio()`` yields, as upstream does after S3Gen.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from gateway.engine.base import SAMPLE_RATE
from gateway.engine.vllm.cfm_solver import GraphBuckets
from gateway.engine.vllm.s3gen_batch import FlowRow, HiftRow, NoiseTapes, S3GenBatch, VoiceRef
from gateway.engine.vllm.vocoder_windows import (
    SAMPLES_PER_FRAME,
    TOKEN_MEL_RATIO,
    SeamState,
    Window,
    WindowPolicy,
    next_window,
)
from gateway.errors import EngineError, EngineUnavailableError
from gateway.settings import Settings

SPEECH_VOCAB_SIZE = 6561
"""Valid S3 speech token ids are below this; T3's start/stop ids (6561, 6562) are not."""


@dataclass(slots=True)
class VocoderStats:
    """Counters the metrics layer reads (monotonic except the ``last_*`` gauges)."""

    batches: int = 0
    rows: int = 0
    first_window_rows: int = 0
    windows_dropped: int = 0
    busy_s: float = 0.0
    audio_s: float = 0.0
    last_batch_rows: int = 0
    last_batch_padded_tokens: int = 0
    rows_per_batch: dict[int, int] = field(default_factory=dict)
    """Histogram: batch size -> batches of that size."""


@dataclass(frozen=True, slots=True)
class _Job:
    """One stream's window as handed to the worker thread (a snapshot, never mutated)."""

    stream: VocoderStream
    voice_key: str
    window: Window
    tokens: tuple[int, ...]
    mel_tail: torch.Tensor | None
    phase: torch.Tensor | None
    start_frame: int
    carry: int


@dataclass(frozen=True, slots=True)
class _Result:
    audio: np.ndarray
    hift_frames: int
    mel_tail: torch.Tensor | None
    phase: torch.Tensor | None
    prompt_tokens: int


class VocoderStream:
    """One utterance's tokens in, its audio out. Use from the event-loop thread."""

    def __init__(self, vocoder: Vocoder, voice_key: str, ref_dict: Mapping[str, Any], one_shot: bool) -> None:
        self._vocoder = vocoder
        self.voice_key = voice_key
        self._ref_dict = ref_dict
        self.one_shot = one_shot
        self._tokens: list[int] = []
        self._finished = False
        self._closed = False
        self._in_flight = False
        self._committed = 0
        self._index = 0
        self._idle_since = next(vocoder._tickets)  # queue position: lower waits longer
        self._prompt_tokens = 250  # budgeting guess (a 10 s prompt) until the voice is prepared
        self._seam = SeamState()
        self._mel_tail: torch.Tensor | None = None
        self._phase: torch.Tensor | None = None
        self._ready_since: float | None = None
        """When the stream's pending window became ready (monotonic; None: none pending)."""
        self._queue: asyncio.Queue[tuple[np.ndarray, int] | BaseException | None] = asyncio.Queue()

    @property
    def tokens_vocoded(self) -> int:
        return self._committed

    def push(self, tokens: Iterable[int]) -> None:
        """Append speech tokens; ids outside the speech vocabulary are dropped (as upstream
        ``drop_invalid_tokens`` does). Ignored once the stream is cancelled or failed (T3 may
        still be delivering deltas); an error after ``finish()``."""
        if self._finished:
            raise RuntimeError("push after finish()")
        if self._closed:
            return
        self._tokens.extend(t for t in map(int, tokens) if 0 <= t < SPEECH_VOCAB_SIZE)
        self._vocoder._wake.set()

    def finish(self) -> None:
        if self._closed:
            return
        self._finished = True
        if not self._tokens:
            self._end(None)
        self._vocoder._wake.set()

    def cancel(self) -> None:
        """Drop this stream's pending and in-flight windows; audio() ends."""
        if not self._closed:
            self._vocoder.stats.windows_dropped += int(self._in_flight)
            self._end(None)

    async def audio(self) -> AsyncIterator[np.ndarray]:
        """The stream's samples in order; closing this iterator early cancels the stream."""
        async with contextlib.aclosing(self.chunks()) as chunks:
            async for samples, _ in chunks:
                yield samples

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        """(samples, tokens vocoded up to and including them), in order: the count travels
        with its samples (later windows may be delivered before a consumer reads these)."""
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    # --- vocoder side -------------------------------------------------------------------
    def _next_window(self) -> Window | None:
        if self._closed or self._in_flight:
            return None
        return next_window(self._vocoder.policy, available=len(self._tokens), committed=self._committed,
                           finished=self._finished, index=self._index, one_shot=self.one_shot)

    def _deliver(self, window: Window, result: _Result, carry: int) -> None:
        self._in_flight = False
        self._idle_since = next(self._vocoder._tickets)
        if self._closed:  # cancelled while in flight: the result is dropped
            return
        start = self._seam.samples_emitted
        audio = self._seam.join(result.audio, hift_frames=result.hift_frames, carry=carry)
        fade = self._vocoder._trim_fade
        if start < fade.shape[0] and audio.size:
            n = min(fade.shape[0] - start, audio.shape[0])
            audio[:n] *= fade[start:start + n]  # upstream's fade-in against reference spill-over
        self._committed, self._index = window.end, window.index + 1
        self._mel_tail, self._phase = result.mel_tail, result.phase
        if audio.size:
            self._queue.put_nowait((audio, self._committed))
        if window.final:
            self._end(None)

    def _end(self, item: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(item)
        self._vocoder._streams.discard(self)


def with_own_flow(s3gen: torch.nn.Module) -> Any:
    """What :class:`Vocoder` needs of ``s3gen`` (flow, HiFT, trim fade), with a copy of the
    flow: the vocoder casts its flow to the serving dtype in place, and ``S3Gen.embed_ref``
    (preparing a voice from a clip) runs in the dtype of ``s3gen.flow``, which must stay fp32."""
    return SimpleNamespace(flow=copy.deepcopy(s3gen.flow), mel2wav=s3gen.mel2wav, trim_fade=s3gen.trim_fade)


class Vocoder:
    """The vocoder loop shared by all streams of one engine."""

    def __init__(self, s3gen: torch.nn.Module, settings: Settings, *, device: torch.device | str = "cpu",
                 flow_dtype: torch.dtype = torch.float32, policy: WindowPolicy | None = None,
                 max_batch_tokens: int = 32768, bucket_tokens: int = 16, noise_seed: int = 0,
                 max_prompt_frames: int = 1000,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        self.settings = settings
        self.policy = policy or WindowPolicy(first_tokens=settings.stream_first_window_tokens,
                                             tokens=settings.stream_window_tokens,
                                             max_tokens=settings.stream_max_window_tokens)
        self.max_batch_rows = settings.vocoder_max_batch
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        self.stats = VocoderStats()
        frames = TOKEN_MEL_RATIO * settings.max_speech_tokens
        tapes = NoiseTapes.generate(
            noise_seed, flow_frames=max_prompt_frames + frames,
            hift_samples=frames * SAMPLES_PER_FRAME,
            harmonics=s3gen.mel2wav.m_source.l_sin_gen.harmonic_num + 1, device=device)
        self.batch = S3GenBatch(s3gen, device=device, flow_dtype=flow_dtype, flow_steps=settings.flow_steps,
                                tapes=tapes, bucket_tokens=bucket_tokens)
        if settings.vocoder_cuda_graphs and torch.device(device).type == "cuda":
            self.batch.cfm.capture(GraphBuckets.plan(
                max_rows=self.max_batch_rows, max_frames=settings.vocoder_graph_max_frames,
                min_frames=min(512, settings.vocoder_graph_max_frames), max_cells=TOKEN_MEL_RATIO * max_batch_tokens))
        if self.policy.lookahead != self.batch.lookahead:
            raise ValueError(f"window lookahead must be the flow's pre-lookahead ({self.batch.lookahead})")
        self._trim_fade = self.batch.trim_fade
        self._voices: OrderedDict[str, VoiceRef] = OrderedDict()  # worker thread only
        self._streams: set[VocoderStream] = set()
        self._tickets = itertools.count()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed_batches = 0
        """Batches failed in a row (reset by a success): a sticky device fault fails them all."""
        self._dead: BaseException | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocoder")
        self._dead = None
        self._task = asyncio.create_task(self._loop(), name="vocoder-loop")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop never returns: if it raised, no window will ever run again, so every open
        stream ends now with a clean error (not a wait forever) and readiness turns red."""
        if task.cancelled() or task is not self._task:
            return
        exc = task.exception()
        self._dead = exc or RuntimeError("the vocoder loop ended")
        for stream in list(self._streams):
            stream._end(EngineUnavailableError(f"the vocoder stopped: {self._dead}"))

    def check_health(self) -> None:
        """Raise :class:`EngineUnavailableError` when the vocoder cannot serve: its loop died,
        or its last ``vocoder_unhealthy_after_failures`` batches all failed (a sticky CUDA
        fault in S3Gen fails every batch)."""
        if self._task is None:
            raise EngineUnavailableError("the vocoder is not running")
        if self._dead is not None:
            raise EngineUnavailableError(f"the vocoder loop died: {self._dead}")
        if self._failed_batches >= self.settings.vocoder_unhealthy_after_failures:
            raise EngineUnavailableError(f"the vocoder's last {self._failed_batches} batches failed")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a loop that died was reported when it did
                pass
        for stream in list(self._streams):
            stream._end(EngineUnavailableError("the vocoder was shut down"))
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)

    def open_stream(self, voice_key: str, ref_dict: Mapping[str, Any], *, one_shot: bool = False) -> VocoderStream:
        if self._task is None or self._dead is not None:
            raise EngineUnavailableError("the vocoder is not running")
        stream = VocoderStream(self, voice_key, ref_dict, one_shot)
        self._streams.add(stream)
        return stream

    async def vocode(self, voice_key: str, ref_dict: Mapping[str, Any], tokens: Sequence[int]) -> np.ndarray:
        """A whole utterance as one window (batched with whatever else is running)."""
        stream = self.open_stream(voice_key, ref_dict, one_shot=True)
        stream.push(tokens)
        stream.finish()
        parts = [a async for a in stream.audio()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    # --- the loop -----------------------------------------------------------------------
    def _collect(self) -> list[tuple[VocoderStream, Window]]:
        now = time.monotonic()
        ready = []
        for s in self._streams:
            if (w := s._next_window()) is not None:
                if s._ready_since is None:
                    s._ready_since = now
                ready.append((s, w))
        # First windows first (time to first audio), then FIFO; but a later window that has
        # waited ``vocoder_max_later_wait_s`` joins the first ones (aging): a stream already
        # playing must not starve and underrun while new streams keep arriving.
        bound = self.settings.vocoder_max_later_wait_s
        ready.sort(key=lambda sw: (sw[1].index > 0 and now - sw[0]._ready_since < bound, sw[0]._idle_since))
        chosen: list[tuple[VocoderStream, Window]] = []
        longest = 0
        for stream, window in ready:
            if len(chosen) >= self.max_batch_rows:
                break
            cost = self.batch.bucket(window.input_tokens + stream._prompt_tokens)
            if chosen and (len(chosen) + 1) * max(longest, cost) > self.max_batch_tokens:
                continue
            longest = max(longest, cost)
            chosen.append((stream, window))
        return chosen

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chosen = self._collect()
            if not chosen:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = []
            for stream, window in chosen:
                stream._in_flight = True
                stream._ready_since = None
                seam = stream._seam
                jobs.append(_Job(
                    stream, stream.voice_key, window,
                    tuple(stream._tokens[window.context_start:window.input_end]),
                    stream._mel_tail, stream._phase, seam.hift_start_frame(),
                    seam.carry_for(window.new_mel_frames, mel_overlap=self.policy.mel_overlap, final=window.final)))
            refs = {s.voice_key: s._ref_dict for s, _ in chosen}
            t0 = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_jobs, jobs, refs)
            except Exception as exc:  # the whole batch failed: fail its streams, keep serving
                outcomes = [exc] * len(jobs)
                self._failed_batches += 1
            else:
                self._failed_batches = 0
            done = [(j, r) for j, r in zip(jobs, outcomes) if isinstance(r, _Result)]
            if done:
                self._count([j for j, _ in done], [r for _, r in done], time.perf_counter() - t0)
            for job, outcome in zip(jobs, outcomes):
                if isinstance(outcome, _Result):
                    job.stream._prompt_tokens = outcome.prompt_tokens
                    try:
                        job.stream._deliver(job.window, outcome, job.carry)
                        continue
                    except Exception as exc:  # never let one stream's seam stop the loop
                        outcome = exc
                job.stream._in_flight = False
                job.stream._end(EngineError(f"vocoder failed: {outcome}"))

    def _count(self, jobs: list[_Job], results: list[_Result], seconds: float) -> None:
        st = self.stats
        st.batches += 1
        st.rows += len(jobs)
        st.first_window_rows += sum(j.window.index == 0 for j in jobs)
        st.busy_s += seconds
        st.audio_s += sum(j.window.new_mel_frames for j in jobs) * SAMPLES_PER_FRAME / SAMPLE_RATE
        st.last_batch_rows = len(jobs)
        st.last_batch_padded_tokens = len(jobs) * self.batch.bucket(
            max(len(j.tokens) + r.prompt_tokens for j, r in zip(jobs, results)))
        st.rows_per_batch[len(jobs)] = st.rows_per_batch.get(len(jobs), 0) + 1
        if self.on_batch is not None:
            self.on_batch(len(jobs), st.last_batch_padded_tokens, seconds)

    def _voice(self, key: str, ref_dict: Mapping[str, Any]) -> VoiceRef:
        voice = self._voices.get(key)
        if voice is None:
            voice = self._voices[key] = self.batch.prepare_voice(ref_dict)
            while len(self._voices) > self.settings.voice_cache_size:
                self._voices.popitem(last=False)
        self._voices.move_to_end(key)
        return voice

    def _run_jobs(self, jobs: list[_Job], refs: Mapping[str, Mapping[str, Any]]) -> list[_Result | Exception]:
        """Worker thread: flow for all rows at once, then HiFT grouped by length. A row whose
        voice cannot be prepared fails alone; the others still run."""
        outcomes: list[_Result | Exception] = []
        voices: list[VoiceRef | None] = []
        for job in jobs:
            try:
                voices.append(self._voice(job.voice_key, refs[job.voice_key]))
            except Exception as exc:  # a malformed reference: that stream's problem only
                voices.append(None)
                outcomes.append(exc)
            else:
                outcomes.append(None)  # type: ignore[arg-type]
        live = [i for i, v in enumerate(voices) if v is not None]
        if not live:
            return outcomes
        mels = self.batch.run_flow([
            FlowRow(voices[i], jobs[i].tokens, jobs[i].window.context_start, jobs[i].window.new_tokens,  # type: ignore[arg-type]
                    jobs[i].window.final) for i in live])
        rows = [HiftRow(mel if jobs[i].mel_tail is None else torch.cat([jobs[i].mel_tail, mel], dim=1),
                        jobs[i].start_frame, jobs[i].phase, jobs[i].carry) for i, mel in zip(live, mels)]
        waves = self.batch.run_hift(rows)
        with self.batch._section("host copy"):
            # One device-to-host copy (one synchronisation) for the whole batch, not one per row.
            flat = torch.cat([wav for wav, _ in waves]).cpu().numpy()
            host = np.split(flat, np.cumsum([wav.shape[0] for wav, _ in waves[:-1]]))
        for i, row, audio, (_, phase) in zip(live, rows, host, waves):
            frames, carry = row.mel.shape[1], jobs[i].carry
            tail = row.mel[:, frames - carry:] if carry else None
            outcomes[i] = _Result(audio, frames, tail, phase, voices[i].prompt_len)  # type: ignore[union-attr]
        return outcomes
