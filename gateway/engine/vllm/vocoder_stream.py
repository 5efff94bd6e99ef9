"""One utterance's side of the vocoder loop: tokens in, audio out, one window in flight.

The engine uses ``push``/``finish``/``cancel``/``audio``/``chunks`` from the event-loop thread.
The loop (:class:`gateway.engine.vllm.vocoder.Vocoder`) uses the "loop side" methods below and
nothing else: it asks for a ready window (``ready_window``), takes it (``take``: a snapshot
handed to the worker thread), and hands back the result (``deliver``) or a failure (``fail``).
All of a stream's state is owned here; the loop owns the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from gateway.engine.base import SAMPLE_RATE, SPEECH_TOKENS_PER_SECOND
from gateway.engine.vllm.vocoder_windows import SeamState, Window, WindowPolicy, fill_window, next_window
from gateway.errors import EngineError
from gateway.observability.timeline import Timeline

SPEECH_VOCAB_SIZE = 6561
"""Valid S3 speech token ids are below this; T3's start/stop ids (6561, 6562) are not."""

PROMPT_TOKENS_GUESS = 250
"""Budgeting guess for a voice's prompt tokens (a 10 s prompt) until the voice is prepared."""

EARLY_MIN_T3_PACE = 1.25
"""An early window (``WindowPolicy.early_s``) goes only while T3 has made this stream's audio
at least this many times faster than real time since its first token: then the small
windows cost little against what T3 keeps making; slower (the card overloaded, every
listener waiting anyway) more windows would only cost more flow work per audio-second."""


class StreamHost(Protocol):
    """What a stream needs of its vocoder loop."""

    policy: WindowPolicy
    trim_fade: np.ndarray

    def wake(self) -> None:
        """New work may be ready."""

    def next_ticket(self) -> int:
        """A FIFO position: lower waits longer."""

    def forget(self, stream: VocoderStream) -> None:
        """The stream has ended: it has no more windows."""

    def count_dropped(self) -> None:
        """A cancelled stream's window was still running: its result will be dropped."""

    def flow_room(self, tokens: int) -> int:
        """Flow tokens a row of ``tokens`` (voice prompt included) could add without its solve
        growing: the rest of the CUDA graph width it pads to (0 without one)."""

    @property
    def window_latency_s(self) -> float:
        """The vocoder's recent time from a window ready to its audio delivered (seconds)."""

    def note_window_latency(self, seconds: float) -> None:
        """A window's audio was delivered ``seconds`` after it was ready."""


@dataclass(frozen=True, slots=True)
class WindowJob:
    """One stream's window as handed to the worker thread (a snapshot, never mutated)."""

    stream: VocoderStream
    voice_key: str
    window: Window
    tokens: tuple[int, ...]
    mel_tail: torch.Tensor | None
    phase: torch.Tensor | None
    start_frame: int
    carry: int
    trace: Timeline | None = None
    """The request's timeline, on the stream's first window only."""


@dataclass(frozen=True, slots=True)
class WindowResult:
    audio: np.ndarray
    hift_frames: int
    mel_tail: torch.Tensor | None
    phase: torch.Tensor | None
    prompt_tokens: int


class VocoderStream:
    """One utterance's tokens in, its audio out. Use from the event-loop thread."""

    def __init__(self, host: StreamHost, voice_key: str, ref_dict: Mapping[str, Any], one_shot: bool,
                 trace: Timeline | None = None) -> None:
        self._host = host
        self.trace = trace
        """The request's first-audio timeline until the first window is delivered (then None)."""
        self.voice_key = voice_key
        self.ref_dict = ref_dict
        """The voice's S3Gen reference (``Conditionals.gen``), prepared by the loop once per voice."""
        self.one_shot = one_shot
        self._tokens: list[int] = []
        self._finished = False
        self._closed = False
        self._in_flight = False
        self._flight_end: int | None = None
        """The in-flight window's end (None when it is final: no more windows)."""
        self._committed = 0
        self._index = 0
        self._idle_since = host.next_ticket()  # queue position: lower waits longer
        self._prompt_tokens = PROMPT_TOKENS_GUESS
        self._seam = SeamState()
        self._mel_tail: torch.Tensor | None = None
        self._phase: torch.Tensor | None = None
        self._ready_since: float | None = None
        """When the stream's pending window became ready (monotonic; None: none pending)."""
        self._first_due: float | None = None
        """When T3 had made the first window's tokens (monotonic): how long the first window
        has waited for the vocoder since (``first_grow_after_s``), planned or not."""
        self._first_audio_at: float | None = None
        """When the first window's audio was queued for the consumer (monotonic)."""
        self._first_token_at: float | None = None
        """When T3's first token for this stream arrived (monotonic): T3's pace since."""
        self._flight_since = 0.0
        """When the window in flight became ready (monotonic): the vocoder's latency."""
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
        if self._first_token_at is None and self._tokens:
            self._first_token_at = time.monotonic()
        policy = self._host.policy
        if self._first_due is None and len(self._tokens) >= policy.first_tokens + policy.lookahead:
            self._first_due = time.monotonic()
        if self.trace is not None and not self._in_flight:
            self.trace.mark(f"t3 tokens: {len(self._tokens)}")
        self._host.wake()

    def finish(self) -> None:
        if self._closed:
            return
        self._finished = True
        if not self._tokens:
            self.end(None)
        self._host.wake()

    def cancel(self) -> None:
        """Drop this stream's pending and in-flight windows; audio() ends."""
        if not self._closed and self._in_flight:
            self._host.count_dropped()
        self.end(None)

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

    def tokens_wanted(self) -> int | None:
        """The token count at which this stream's next window becomes due (its tokens plus
        the lookahead, at the planned size), None when no window waits for tokens (one-shot:
        all at the end; the final window in flight; ended). T3's deliveries end their groups
        here (:mod:`gateway.engine.vllm.t3.delivery`)."""
        if self._closed or self.one_shot:
            return None
        policy = self._host.policy
        if self._in_flight:
            if self._flight_end is None:
                return None
            committed, index = self._flight_end, self._index + 1
        else:
            committed, index = self._committed, self._index
        return committed + policy.size(index) + policy.lookahead

    @property
    def closed(self) -> bool:
        """True once the stream has ended (finished, cancelled or failed)."""
        return self._closed

    # --- what a T3 pause weighs (:mod:`gateway.engine.vllm.t3_pause`) ---------------------
    @property
    def t3_done(self) -> bool:
        """T3 has made all of this stream's tokens (``finish`` was called)."""
        return self._finished

    @property
    def first_window_taken(self) -> bool:
        """The first window has gone to the vocoder (in flight or delivered): the stream's
        first audio waits for the vocoder, not for T3."""
        return self._index > 0 or self._in_flight

    def t3_lead_s(self, now: float) -> float | None:
        """Seconds of audio T3 has made for this stream beyond what its listener has heard by
        ``now``, playing from the first audio in real time; None before the first audio."""
        if self._first_audio_at is None:
            return None
        return len(self._tokens) / SPEECH_TOKENS_PER_SECOND - (now - self._first_audio_at)

    # --- loop side ----------------------------------------------------------------------
    @property
    def ready_since(self) -> float | None:
        """When the pending window became ready (monotonic), None when none is pending."""
        return self._ready_since

    @property
    def idle_since(self) -> int:
        """FIFO ticket of the stream's last delivery (or its opening): lower waits longer."""
        return self._idle_since

    def ready_window(self, now: float) -> Window | None:
        """The window the stream could run now (None while one is in flight or none is due);
        ``now`` is remembered as the moment it became ready."""
        if self._closed or self._in_flight:
            return None
        # a first window's wait counts from its tokens' arrival: the loop plans only between
        # batches, so a window can wait a whole batch or two before it is first looked at
        due = self._first_due if self._index == 0 else self._ready_since
        waited = max(0.0, now - due) if due is not None else 0.0
        window = next_window(self._host.policy, available=len(self._tokens), committed=self._committed,
                             finished=self._finished, index=self._index, one_shot=self.one_shot, waited_s=waited,
                             early=self._listener_short(now))
        if window is not None and window.index > 0 and not window.final:
            # tokens already here that fit the flow width the window pads to anyway
            window = fill_window(window, room=self._host.flow_room(self.cost_tokens(window)),
                                 available=len(self._tokens))
        if window is not None and self._ready_since is None:
            self._ready_since = now
            if self.trace is not None:
                self.trace.mark(f"vocoder window ready ({window.input_tokens} tokens)")
        return window

    def listener_left_s(self, now: float) -> float | None:
        """Seconds of audio delivered that the listener, playing from the first audio in
        real time, has not heard by ``now`` (negative: it is waiting); None before the first
        audio."""
        if self._first_audio_at is None:
            return None
        return self._seam.samples_emitted / SAMPLE_RATE - (now - self._first_audio_at)

    def _listener_short(self, now: float) -> bool:
        """Whether a later window should go early (``WindowPolicy.early_s``): the listener,
        playing from the first audio in real time, has less audio left than ``early_s`` plus
        the vocoder's recent latency, and T3 keeps well ahead of real time for this stream."""
        early_s = self._host.policy.early_s
        if early_s <= 0 or self._index == 0 or self._finished or self.one_shot:
            return False
        left = self.listener_left_s(now)
        if left is None or self._first_token_at is None:
            return False
        if left >= early_s + self._host.window_latency_s:
            return False
        made_s = len(self._tokens) / SPEECH_TOKENS_PER_SECOND
        return made_s >= EARLY_MIN_T3_PACE * max(now - self._first_token_at, 1e-3)

    def cost_tokens(self, window: Window) -> int:
        """Flow tokens the window costs in a batch (its input plus the voice's prompt)."""
        return window.input_tokens + self._prompt_tokens

    def take(self, window: Window) -> WindowJob:
        """Mark ``window`` in flight and snapshot what the worker thread needs for it."""
        self._in_flight = True
        self._flight_end = None if window.final else window.end
        self._flight_since = self._ready_since if self._ready_since is not None else time.monotonic()
        self._ready_since = None
        seam = self._seam
        return WindowJob(
            self, self.voice_key, window, tuple(self._tokens[window.context_start:window.input_end]),
            self._mel_tail, self._phase, seam.hift_start_frame(),
            seam.carry_for(window.new_mel_frames, mel_overlap=self._host.policy.mel_overlap, final=window.final),
            self.trace if window.index == 0 else None)

    def deliver(self, job: WindowJob, result: WindowResult) -> None:
        """The job's audio: joined at the seam and queued for ``audio()`` (dropped if cancelled)."""
        window = job.window
        self._in_flight = False
        self._host.note_window_latency(time.monotonic() - self._flight_since)
        self._prompt_tokens = result.prompt_tokens
        self._idle_since = self._host.next_ticket()
        if self._closed:  # cancelled while in flight: the result is dropped
            return
        start = self._seam.samples_emitted
        audio = self._seam.join(result.audio, hift_frames=result.hift_frames, carry=job.carry)
        fade = self._host.trim_fade
        if start < fade.shape[0] and audio.size:
            n = min(fade.shape[0] - start, audio.shape[0])
            audio[:n] *= fade[start:start + n]  # upstream's fade-in against reference spill-over
        self._committed, self._index = window.end, window.index + 1
        self._mel_tail, self._phase = result.mel_tail, result.phase
        if self.trace is not None:
            self.trace.mark("vocoder audio delivered")
            self.trace = None
        if audio.size:
            if self._first_audio_at is None:
                self._first_audio_at = time.monotonic()
            self._queue.put_nowait((audio, self._committed))
        if window.final:
            self.end(None)

    def fail(self, reason: object) -> None:
        """The job in flight failed: the stream ends with an EngineError."""
        self._in_flight = False
        self.end(EngineError(f"vocoder failed: {reason}"))

    def end(self, error: BaseException | None) -> None:
        """End the stream: ``audio()`` finishes, or raises ``error``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(error)
        self._host.forget(self)
