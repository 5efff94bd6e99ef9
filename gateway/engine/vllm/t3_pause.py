"""T3 pauses while a batch of first windows runs on the GPU (``t3_first_window_pause_ms``).

At one stream the first window's CFM took 67 ms in the server against 42 ms alone (H100,
2026-12-05, the vocoder's stream at high priority or not): T3 goes on decoding the same
request's next tokens beside it, ~3 ms steps of small kernels that the GPU interleaves with
the solve's. Those tokens are not needed yet (T3 makes ~12 audio-seconds a second at one
stream), the first audio is. So, with the engine core in a thread of this process
(``vllm_engine_core = "thread"``), the vocoder asks the engine thread to hold its next step
until the batch's device work (flow encoder, CFM, HiFT) is done, and at most the setting's
milliseconds; and only when no T3 request would feel it (:func:`t3_may_pause`): every stream
T3 is still decoding for has either its first window on the way to the GPU (it waits for
the vocoder, not for T3), or audio made ahead of its listener by more than the pause plus
:data:`MIN_LEAD_S`. Under load T3 runs behind real time and is never paused: the pause trades
T3 time that nobody waits for against a first window's solve.

Threads: the event loop decides and calls :meth:`T3Pause.hold` before it hands the batch to
the vocoder's worker; the worker, once the batch's work is queued on the device, says when it
ends (:meth:`T3Pause.until`, a CUDA event's ``query``); the engine thread calls
:meth:`T3Pause.wait` before each step. A later hold replaces an earlier one (the vocoder's
batches run in order on its stream: the later one's end is the later end).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

MIN_LEAD_S = 1.0
"""Audio a listener must have ahead of it, beyond the pause, before T3 may pause: the time the
vocoder needs to turn T3's next tokens into that listener's next window."""

POLL_S = 0.0005
"""How often the waiting engine thread looks at the device (it sleeps between: the GIL is free)."""


class PausingStream(Protocol):
    """What :func:`t3_may_pause` reads of a vocoder stream."""

    @property
    def closed(self) -> bool: ...

    @property
    def t3_done(self) -> bool: ...

    @property
    def first_window_taken(self) -> bool: ...

    def t3_lead_s(self, now: float) -> float | None: ...


def t3_may_pause(streams: Iterable[PausingStream], pause_s: float, now: float) -> bool:
    """Whether T3 may stop for ``pause_s`` without any listener hearing it: every open stream
    that T3 still decodes for waits for the vocoder (its first window taken) or is ahead of
    its listener by more than ``pause_s`` plus :data:`MIN_LEAD_S`. A stream still waiting for
    its first window's tokens (or a one-shot one, for all of them) would wait longer."""
    for stream in streams:
        if stream.closed or stream.t3_done:
            continue
        lead = stream.t3_lead_s(now)
        if lead is None:
            if not stream.first_window_taken:
                return False
        elif lead < pause_s + MIN_LEAD_S:
            return False
    return True


class T3Pause:
    """One process's pause between T3's engine thread and the vocoder (see the module
    docstring). ``max_s``: the longest one hold lasts."""

    def __init__(self, max_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_s <= 0:
            raise ValueError("a pause needs a positive bound")
        self.max_s = max_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._until = 0.0
        self._done: Callable[[], bool] | None = None
        self.holds = 0
        """Holds asked for (the event loop)."""
        self.held_s = 0.0
        """Seconds the engine thread waited in them."""

    def hold(self) -> None:
        """Event loop: T3 takes no new step from now until :meth:`until`'s condition holds, and
        at most ``max_s``."""
        with self._lock:
            self._until = self._clock() + self.max_s
            self._done = None
            self.holds += 1

    def until(self, done: Callable[[], bool]) -> None:
        """Vocoder worker: the hold ends once ``done()`` (the batch's work on the device)."""
        with self._lock:
            self._done = done

    def release(self) -> None:
        """End any hold now (a batch that failed to launch)."""
        with self._lock:
            self._until = 0.0
            self._done = None

    def wait(self) -> float:
        """Engine thread, before a step: wait out the hold, if any; returns seconds waited."""
        start = None
        while True:
            with self._lock:
                now = self._clock()
                if now >= self._until or (self._done is not None and self._done()):
                    self._until, self._done = 0.0, None  # over: later steps need not ask again
                    break
                left = self._until - now
            start = now if start is None else start
            self._sleep(min(POLL_S, left))
        if start is None:
            return 0.0
        waited = self._clock() - start
        self.held_s += waited
        return waited
