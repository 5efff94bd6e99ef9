"""One utterance fed text over time: each text chunk its own engine job, all of them one audio
stream, with exact chunk boundaries and character timings.

Voice agents send text as their LLM writes it; the ElevenLabs face cuts it into chunks
(:mod:`gateway.speech.text_stream`) and hands each to an :class:`Utterance` the moment it is
cut, so the engine starts on the first sentence while the rest is still being written. The
``with-timestamps`` routes use the same class with the whole text at once.

How it runs:

- :meth:`Utterance.say` queues a chunk and returns at once; one *synthesis* task runs the
  chunks in order. For each it takes an admission slot (the same controller, 429 and 503 as
  for HTTP, in the fair shares of the plan's caller: its client and its key), resolves the voice (cached after the first chunk), starts an engine job for the
  chunk (its text through the same front end as a whole request: ``speech_chunks``), feeds
  the samples on, and releases the job and the slot as soon as the chunk's audio is out, so a
  context waiting for its LLM holds no slot. Each step is bounded by ``request_timeout_s``
  from the chunk's start.
- the samples of all chunks go through **one** encoder (the utterance is one file in the
  output format; the same two encoder routes as every response), read by a *pump* task that
  turns its bytes into :class:`AudioBytes` events.
- when a chunk's audio is complete, a :class:`ChunkTimings` event gives its exact start and end
  in the utterance and its character timings (an estimate, see :mod:`gateway.speech.alignment`),
  for the original text and for the normalised text the engine read.

Cleanup has one path: :meth:`aclose` (also what :meth:`cancel`, barge-in, does) cancels the
synthesis task, whose per-chunk exit stack closes the engine job (the engine drops the work)
and then releases the slot; then the pump and the encoder (worker thread joined, or FFmpeg
killed). All of it shielded, so a caller being cancelled cannot cut the cleanup short.

Queues between the stages are small (backpressure): a consumer that stops reading stops the
encoder, then the engine job, within a few pieces of audio; the caller bounds how long it
waits for the consumer (the WebSocket send timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import anyio
import numpy as np
import structlog

from gateway.audio.encoder import encode_audio
from gateway.audio.formats import FormatSpec
from gateway.engine.base import AudioChunk, GenerationParams, SynthesisJob, Voice
from gateway.engine.chunk_edges import chunk_seed
from gateway.errors import EncoderError, GatewayError
from gateway.http.caller import Caller
from gateway.http.protocol import MAX_SEED
from gateway.iterators import aclose_quietly
from gateway.models.families import Family
from gateway.server.services import AppServices
from gateway.speech.admission import next_within, within_deadline
from gateway.speech.alignment import Aligner, CharTimings, ProportionalAligner
from gateway.http.protocol import SpeechRequest
from gateway.observability.request_record import current_record
from gateway.speech.service import (
    admit,
    generation_params,
    resolve_language_of,
    resolve_model_and_voice,
    split_speech,
    voice_is_a_parameter,
)
from gateway.voices.library import VoiceInfo

SAMPLES_READAHEAD = 4
"""Engine pieces that may wait for the encoder (then the engine job waits)."""
EVENTS_READAHEAD = 8
"""Encoded pieces that may wait for the consumer (then the encoder waits)."""


@dataclass(frozen=True, slots=True)
class SpeechPlan:
    """What every chunk of an utterance shares, resolved (and validated) before it starts."""

    family: Family
    voice: VoiceInfo
    """Looked up among the voices ``caller`` may use."""
    params: GenerationParams
    output: FormatSpec
    caller: Caller
    """Who asks: every chunk's admission slot counts against its client's and key's shares."""
    language: str | None = None
    """ISO 639-1, or None: detected from the first chunk (multilingual family only)."""
    speed: float = 1.0


async def plan_speech(
    services: AppServices, request: SpeechRequest, output: FormatSpec, caller: Caller, *, text: str | None = None
) -> SpeechPlan:
    """Resolve and check what every chunk shares, as a whole request would (404 model, 400
    voice or language, 503 while loading), the voice among those ``caller`` may use; records
    it on the request's record. The language is checked now when it can be: given, or
    ``text`` known (else the first chunk decides)."""
    family, voice = resolve_model_and_voice(services, request, caller)
    record = current_record()
    record.model, record.voice = request.model, request.voice_name
    language = request.language
    if text is not None or not (family.multilingual and language is None):
        language = await resolve_language_of(family, language, text or "")
        record.language = language
    return SpeechPlan(
        family=family,
        voice=voice,
        params=generation_params(request, services.settings, family),
        output=output,
        caller=caller,
        language=language,
        speed=1.0 if request.speed is None else request.speed,
    )


@dataclass(frozen=True, slots=True)
class AudioBytes:
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkTimings:
    index: int
    text: str
    """The chunk as it was said (raw, whitespace included)."""
    spoken: str
    """What the engine read: the chunk normalised (its engine chunks joined by spaces), with
    the chunk's own leading and trailing whitespace."""
    start_s: float
    """Exact: where the chunk's audio starts in the utterance (seconds, as played)."""
    end_s: float
    """Exact: where it ends."""
    chars: CharTimings
    """Estimated times of ``text``'s characters, relative to ``start_s``."""
    spoken_chars: CharTimings
    """Estimated times of ``spoken``'s characters, relative to ``start_s``."""


@dataclass(slots=True)
class UtteranceStats:
    """What the utterance did (for its log line and the metrics)."""

    chunks_said: int = 0
    chunks_spoken: int = 0
    chars_said: int = 0
    audio_samples: int = 0
    speech_tokens: int = 0
    queued_s: float = 0.0
    first_said_at: float | None = None
    first_audio_at: float | None = None
    """``time.monotonic()`` of the first chunk said and of the first encoded bytes."""
    language: str | None = None
    engine_job_ids: list[str] = field(default_factory=list)


class _End:
    __slots__ = ()


_END = _End()


class Utterance:
    """See the module docstring. Use from one event loop; always ``aclose()`` it."""

    def __init__(
        self,
        services: AppServices,
        plan: SpeechPlan,
        *,
        request_id: str,
        aligner: Aligner | None = None,
    ) -> None:
        self._services = services
        self._plan = plan
        self._request_id = request_id
        self._aligner = aligner or ProportionalAligner()
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self._samples: asyncio.Queue[np.ndarray | None] = asyncio.Queue(SAMPLES_READAHEAD)
        self._events: asyncio.Queue[AudioBytes | ChunkTimings | _End] = asyncio.Queue(EVENTS_READAHEAD)
        self._synthesis: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._finished = False
        self._closed = False
        self._error: BaseException | None = None
        self._pending_chars = 0
        self._voice: Voice | None = None
        self.stats = UtteranceStats(language=plan.language)

    # --- input ---------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """No more text will be said (``finish`` was called)."""
        return self._finished

    @property
    def failed(self) -> bool:
        """A chunk failed: nothing said from now on is spoken (``events`` raises the error)."""
        return self._error is not None

    @property
    def pending_chars(self) -> int:
        """Characters said whose audio is not complete yet."""
        return self._pending_chars

    def say(self, text: str) -> None:
        """Queue a chunk of text; its audio follows the previous chunk's."""
        if self._finished or self._closed:
            raise RuntimeError("the utterance is finished")
        if not text.strip():
            return
        if self._synthesis is None:
            self.stats.first_said_at = time.monotonic()
            self._synthesis = asyncio.create_task(self._synthesise(), name=f"utterance-{self._request_id}")
            self._pump = asyncio.create_task(self._pump_encoded(), name=f"utterance-pump-{self._request_id}")
        self.stats.chunks_said += 1
        self.stats.chars_said += len(text)
        self._pending_chars += len(text)
        self._chunks.put_nowait(text)

    def finish(self) -> None:
        """No more text: the events end after the last chunk's audio."""
        if self._finished:
            return
        self._finished = True
        if self._synthesis is None:
            self._events.put_nowait(_END)  # nothing was said: nothing to encode
        else:
            self._chunks.put_nowait(None)

    # --- output --------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[AudioBytes | ChunkTimings]:
        """Audio and timings in order, until the utterance is finished and all its audio out.
        Raises the first error (a GatewayError: 429/503 admission, engine, encoder, time limit)
        after the audio made before it."""
        while not isinstance(event := await self._events.get(), _End):
            yield event
        if self._error is not None:
            raise self._error

    # --- ending --------------------------------------------------------------------------------

    async def cancel(self) -> None:
        """Barge-in: stop now. The engine job is dropped and the slot released before this
        returns; the events end (without an error)."""
        await self.aclose()

    async def aclose(self) -> None:
        """Release everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._finished = True
        with anyio_shield():
            for task in (self._synthesis, self._pump):
                if task is not None and not task.done():
                    task.cancel()
            for task in (self._synthesis, self._pump):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        # what was made and not taken yet is dropped (barge-in: not one more piece of audio),
        # and a consumer still in events() ends there
        while not self._events.empty():
            self._events.get_nowait()
        self._events.put_nowait(_END)

    # --- the synthesis task --------------------------------------------------------------------

    async def _synthesise(self) -> None:
        index = 0
        try:
            while (text := await self._chunks.get()) is not None:
                await self._speak(index, text)
                self._pending_chars -= len(text)
                index += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the chunk's error ends the utterance; audio made so far stays
            self._error = exc
            if not isinstance(exc, GatewayError):
                structlog.get_logger("gateway.speech").error("utterance_failed", error=repr(exc), exc_info=exc)
        finally:
            # None ends the encoder (through the pump); when closing, the pump is cancelled too
            if not self._closed:
                await self._samples.put(None)

    async def _speak(self, index: int, text: str) -> None:
        """One chunk: slot, voice, engine job; its samples to the encoder; then its timings."""
        services, plan = self._services, self._plan
        settings = services.settings
        deadline = time.monotonic() + settings.request_timeout_s
        engine = services.ready_engine()
        _, voice_cache = services.ready_voices()
        chunks = await split_speech(text, plan.family, settings.max_chunk_chars)
        if self.stats.language is None:
            self.stats.language = await resolve_language_of(plan.family, plan.language, text)
        pieces: list[np.ndarray] = []
        async with contextlib.AsyncExitStack() as stack:
            slot = await admit(services, plan.caller, current_record())
            stack.callback(slot.release)
            self.stats.queued_s += slot.queued_s
            if self._voice is None:
                async with within_deadline(deadline):
                    with voice_is_a_parameter():
                        self._voice = await voice_cache.get(plan.voice, plan.family.id)
            job_id = f"{self._request_id}-{index}"
            self.stats.engine_job_ids.append(job_id)
            job = SynthesisJob(
                request_id=job_id,
                chunks=chunks,
                voice=self._voice,
                params=_chunk_params(plan.params, index),
                model=plan.family.id,
                language=self.stats.language,
                streaming=True,
            )
            produced = engine.synthesize(job)
            stack.push_async_callback(aclose_quietly, produced)
            while True:
                try:
                    audio: AudioChunk = await next_within(produced, deadline, what="speech chunk")
                except StopAsyncIteration:
                    break
                self.stats.speech_tokens += audio.speech_tokens
                if len(audio.samples):
                    pieces.append(audio.samples)
                    await self._samples.put(audio.samples)
        await self._emit_timings(index, text, _spoken(text, chunks), pieces, engine.sample_rate)

    async def _emit_timings(self, index: int, text: str, spoken: str, pieces: list[np.ndarray], rate: int) -> None:
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        speed = self._plan.speed
        start = self.stats.audio_samples / rate / speed
        self.stats.audio_samples += len(samples)
        end = self.stats.audio_samples / rate / speed
        duration = end - start
        # a forced aligner would be heavy: keep alignment off the event loop
        chars, spoken_chars = await asyncio.to_thread(
            lambda: (
                self._aligner.align(text, samples, rate, duration_s=duration),
                self._aligner.align(spoken, samples, rate, duration_s=duration),
            )
        )
        self.stats.chunks_spoken += 1
        await self._events.put(ChunkTimings(index, text, spoken, start, end, chars, spoken_chars))

    # --- the pump task -------------------------------------------------------------------------

    async def _pump_encoded(self) -> None:
        plan, settings = self._plan, self._services.settings
        engine = self._services.ready_engine()
        encoded = encode_audio(
            self._sample_source(),
            response_format=plan.output,
            sample_rate=engine.sample_rate,
            speed=plan.speed,
            route=settings.audio_encoder,
        )
        try:
            async for data in encoded:
                if self.stats.first_audio_at is None:
                    self.stats.first_audio_at = time.monotonic()
                await self._events.put(AudioBytes(data))
        except EncoderError as exc:
            self._error = self._error or exc
        finally:
            with anyio_shield():
                await aclose_quietly(encoded)
            if not self._closed:
                await self._events.put(_END)

    async def _sample_source(self) -> AsyncIterator[np.ndarray]:
        while (samples := await self._samples.get()) is not None:
            yield samples


def _spoken(text: str, chunks: tuple[str, ...]) -> str:
    """What the engine read, with the whitespace around the chunk as it was sent: clients that
    join the characters of consecutive chunks into words still see where one ends."""
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    return lead + " ".join(chunks) + trail


def _chunk_params(params: GenerationParams, index: int) -> GenerationParams:
    """The chunk's own seed when the request is seeded (reproducible, and chunks still differ);
    the first chunk uses the request's seed itself, as a one-chunk request would."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=chunk_seed(params.seed, index) % (MAX_SEED + 1))


def anyio_shield() -> anyio.CancelScope:
    """Shield cleanup from a cancellation of the caller (see speech.service._unwind)."""
    return anyio.CancelScope(shield=True)
