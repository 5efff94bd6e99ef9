"""Admission control: a bounded number of requests synthesising, a bounded FIFO queue in front.

Why: every admitted request holds GPU/CPU time and memory until its audio is done. Past a
fixed amount of work, more requests only make every stream slower, so we refuse early and
cheaply instead:

- a free slot: admitted at once;
- no free slot, room in the queue: wait (FIFO) for a slot, at most ``queue_timeout_s``;
  waiting longer gives **503** ``queue_timeout`` with ``Retry-After`` (the client did nothing
  wrong; the server could not start its work in time; the OpenAI SDK retries 503);
- no free slot and the queue full: **429** ``server_overloaded`` with ``Retry-After``,
  answered at once, before any engine work (the SDK retries 429 after Retry-After).

A request holds its :class:`Slot` from before its engine work starts until its last byte is
sent (or it is cancelled); ``Slot.release`` is idempotent so every exit path may call it.

The total time limit (``request_timeout_s``) is :func:`next_within` and :func:`within_deadline`:
every step of a request (the voice, each piece of engine audio and encoder output) is bounded
by the time left, so a stuck engine or encoder call cannot pin a connection forever. Before the response starts this ends as a 504 envelope; mid-stream the
stream is closed (the caller logs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TypeVar

from gateway.errors import EngineUnavailableError, OverloadedError, RequestTimeoutError
from gateway.settings import Settings

T = TypeVar("T")

UPLOADS_IN_FLIGHT = 2
UPLOADS_QUEUED = 8


class QueueTimeoutError(EngineUnavailableError):
    """Waited ``queue_timeout_s`` for a slot without getting one."""

    code = "queue_timeout"


class Slot:
    """One admitted request's share of the in-flight budget."""

    __slots__ = ("_controller", "_released", "admitted_at", "queued_s")

    def __init__(self, controller: AdmissionController, queued_s: float) -> None:
        self._controller = controller
        self._released = False
        self.admitted_at = time.monotonic()
        self.queued_s = queued_s

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release()

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdmissionController:
    """Bounded in-flight work plus a bounded FIFO queue. One per app, used on its event loop."""

    def __init__(
        self,
        *,
        max_in_flight: int,
        max_queued: int,
        queue_timeout_s: float,
        retry_after_s: int = 1,
    ) -> None:
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.rejected_total = 0
        self.timed_out_total = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionController:
        return cls(
            max_in_flight=settings.max_in_flight,
            max_queued=settings.max_queued,
            queue_timeout_s=settings.queue_timeout_s,
        )

    @classmethod
    def for_uploads(cls, settings: Settings) -> AdmissionController:
        """Voice uploads: a few at a time (each decodes up to 10 MiB with FFmpeg and writes a
        FLAC), so a burst of uploads cannot starve speech of CPU."""
        return cls(
            max_in_flight=UPLOADS_IN_FLIGHT, max_queued=UPLOADS_QUEUED, queue_timeout_s=settings.queue_timeout_s
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def close(self) -> None:
        """Refuse every new request and every waiter (shutdown); admitted ones run on."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(EngineUnavailableError("The server is shutting down.", code="shutting_down"))

    async def acquire(self) -> Slot:
        """A slot, at once or after a FIFO wait; raises 429/503 as the module doc says."""
        if self._closed:
            raise EngineUnavailableError("The server is shutting down.", code="shutting_down")
        if self._in_flight < self.max_in_flight and self.queued == 0:
            self._in_flight += 1
            return Slot(self, 0.0)
        if self.queued >= self.max_queued:
            self.rejected_total += 1
            raise OverloadedError(
                f"The server is at capacity ({self.max_in_flight} requests in flight, "
                f"{self.max_queued} queued); retry after {self.retry_after_s} s.",
                retry_after_s=self.retry_after_s,
            )
        started = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # the slot was handed over just as we gave up: pass it on, don't leak it
                self._release()
            else:
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                self.timed_out_total += 1
                raise QueueTimeoutError(
                    f"Waited {self.queue_timeout_s:g} s in the queue without a free slot; retry later.",
                    retry_after_s=max(1, math.ceil(self.queue_timeout_s / 4)),
                ) from None
            raise
        return Slot(self, time.monotonic() - started)

    def _release(self) -> None:
        # hand the slot straight to the oldest live waiter (in_flight stays the same), else free it
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_flight -= 1


async def next_within(source: AsyncIterator[T], deadline: float, *, what: str = "request") -> T:
    """The next item of ``source`` if it comes before ``deadline`` (``time.monotonic()``), else
    RequestTimeoutError. A producer stuck inside its ``__anext__`` is cancelled at the deadline
    (its own cleanup runs then); closing ``source`` is the caller's job. StopAsyncIteration
    when it is exhausted."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RequestTimeoutError(f"The {what} exceeded its time limit and was stopped.")
    try:
        async with asyncio.timeout(remaining):
            return await anext(source)
    except TimeoutError:
        raise RequestTimeoutError(f"The {what} exceeded its time limit and was stopped.") from None


@contextlib.asynccontextmanager
async def within_deadline(deadline: float, *, what: str = "request") -> AsyncIterator[None]:
    """Bound a block (e.g. resolving a voice) by the same total deadline; 504 past it."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"The {what} exceeded its time limit and was stopped.") from None
