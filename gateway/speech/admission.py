"""Admission control: a bounded number of requests synthesising, a bounded FIFO queue in front,
and a fair share of both for each client and each API key.

Why: every admitted request holds GPU/CPU time and memory until its audio is done. Past a
fixed amount of work, more requests only make every stream slower, so we refuse early and
cheaply instead:

- a free slot: admitted at once;
- no free slot, room in the queue: wait (FIFO) for a slot, at most ``queue_timeout_s``;
  waiting longer gives **503** ``queue_timeout`` with ``Retry-After`` (the client did nothing
  wrong; the server could not start its work in time; the OpenAI SDK retries 503);
- no free slot and the queue full: **429** ``server_overloaded`` with ``Retry-After``,
  answered at once, before any engine work (the SDK retries 429 after Retry-After).

Fair shares: a few clients that send requests and then stop reading (each holds its slot
until ``send_timeout_s``), re-sent as soon as they are dropped, would otherwise keep most
slots busy. So each *party* (a client address, an API key; see ``gateway.http.caller``) may
hold at most its :class:`Share`: ``ceil(share x max_in_flight)`` requests in flight and
``ceil(share x max_queued)`` waiting. A party at its in-flight share waits in the queue even
while slots are free, and others pass it; a party at both shares gets **429**
``client_concurrency_limit`` / ``key_concurrency_limit`` at once. A full server is
``server_overloaded`` whoever asks. The queue stays FIFO among those who may run.

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
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from gateway.errors import EngineUnavailableError, OverloadedError, RequestTimeoutError
from gateway.settings import Settings

T = TypeVar("T")

UPLOADS_IN_FLIGHT = 2
UPLOADS_QUEUED = 8

PartyKind = Literal["client", "key"]
Party = tuple[PartyKind, str]
_SHARE_SETTING = {"client": "max_client_share", "key": "max_key_share"}
_PARTY_NAME = {"client": "this client (address)", "key": "this API key"}


class QueueTimeoutError(EngineUnavailableError):
    """Waited ``queue_timeout_s`` for a slot without getting one."""

    code = "queue_timeout"


class ShareLimitError(OverloadedError):
    """One client or key holds its share of the server: in flight and waiting."""

    def __init__(self, kind: PartyKind, share: Share, *, retry_after_s: int) -> None:
        super().__init__(
            f"Too many concurrent requests from {_PARTY_NAME[kind]}: it holds its share of the server "
            f"({share.in_flight} in flight, {share.queued} waiting; {_SHARE_SETTING[kind]}); "
            f"retry after {retry_after_s} s.",
            retry_after_s=retry_after_s,
            code=f"{kind}_concurrency_limit",
        )
        self.limit = kind


@dataclass(frozen=True, slots=True)
class Share:
    """The most one party may hold at once."""

    in_flight: int
    queued: int

    @classmethod
    def of(cls, fraction: float, max_in_flight: int, max_queued: int) -> Share:
        # the epsilon keeps 0.1 x 30 at 3, not 4 (0.1 * 30 == 3.0000000000000004)
        return cls(max(1, math.ceil(fraction * max_in_flight - 1e-9)), max(0, math.ceil(fraction * max_queued - 1e-9)))


@dataclass(slots=True)
class _Holding:
    in_flight: int = 0
    queued: int = 0


_NOTHING = _Holding()
"""What a party that holds nothing holds (read, never written)."""


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[None]
    parties: tuple[Party, ...]
    queued: bool = field(default=True)


class Slot:
    """One admitted request's share of the in-flight budget."""

    __slots__ = ("_controller", "_parties", "_released", "admitted_at", "queued_s")

    def __init__(self, controller: AdmissionController, queued_s: float, parties: tuple[Party, ...] = ()) -> None:
        self._controller = controller
        self._parties = parties
        self._released = False
        self.admitted_at = time.monotonic()
        self.queued_s = queued_s

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self._parties)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdmissionController:
    """Bounded in-flight work plus a bounded FIFO queue, shared fairly between clients and
    keys (see the module docstring). One per app, used on its event loop."""

    def __init__(
        self,
        *,
        max_in_flight: int,
        max_queued: int,
        queue_timeout_s: float,
        retry_after_s: int = 1,
        client_share: float = 1.0,
        key_share: float = 1.0,
    ) -> None:
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        # a share of 1 is no limit: such parties are not even counted
        self.shares: dict[PartyKind, Share] = {
            kind: Share.of(fraction, max_in_flight, max_queued)
            for kind, fraction in (("client", client_share), ("key", key_share))
            if fraction < 1.0
        }
        self._in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        self._holdings: dict[Party, _Holding] = {}
        self._closed = False
        self.rejected_total = 0
        self.rejected_by: Counter[str] = Counter()
        """429s by the limit that refused them: ``server``, ``client``, ``key``."""
        self.timed_out_total = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, key_count: int = 0) -> AdmissionController:
        """Speech admission; the per-key share applies only with two keys or more."""
        return cls(
            max_in_flight=settings.max_in_flight,
            max_queued=settings.max_queued,
            queue_timeout_s=settings.queue_timeout_s,
            client_share=settings.max_client_share,
            key_share=settings.max_key_share if key_count >= 2 else 1.0,
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
        return sum(1 for w in self._waiters if not w.future.done())

    def held_by(self, kind: PartyKind, party: str) -> tuple[int, int]:
        """(in flight, waiting) of one client or key (0, 0 when it holds nothing or is not counted)."""
        holding = self._holdings.get((kind, party))
        return (holding.in_flight, holding.queued) if holding else (0, 0)

    def close(self) -> None:
        """Refuse every new request and every waiter (shutdown); admitted ones run on."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            self._leave_queue(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(EngineUnavailableError("The server is shutting down.", code="shutting_down"))

    async def acquire(self, *, client: str | None = None, key: str | None = None) -> Slot:
        """A slot, at once or after a FIFO wait; raises 429/503 as the module doc says.
        ``client`` and ``key`` name the parties whose shares apply (None: not counted)."""
        if self._closed:
            raise EngineUnavailableError("The server is shutting down.", code="shutting_down")
        parties = tuple((kind, name) for kind, name in (("client", client), ("key", key)) if name and kind in self.shares)
        if self._in_flight < self.max_in_flight and self._may_run(parties):
            # a free slot means every waiter is held back by its own share: this one may pass
            self._start(parties)
            return Slot(self, 0.0, parties)
        queue_full = self.queued >= self.max_queued
        if queue_full and self._in_flight >= self.max_in_flight:
            self._refuse("server")
            raise OverloadedError(
                f"The server is at capacity ({self.max_in_flight} requests in flight, "
                f"{self.max_queued} queued); retry after {self.retry_after_s} s.",
                retry_after_s=self.retry_after_s,
            )
        # slots free or room to wait, but not for this party: its share is what refuses it
        for kind, name in parties:
            held, share = self._held((kind, name)), self.shares[kind]
            if held.queued >= share.queued or (queue_full and held.in_flight >= share.in_flight):
                self._refuse(kind)
                raise ShareLimitError(kind, share, retry_after_s=self.retry_after_s)
        started = time.monotonic()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), parties)
        self._waiters.append(waiter)
        for party in parties:
            self._holding(party).queued += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                # the slot was handed over just as we gave up: pass it on, don't leak it
                self._release(parties)
            else:
                waiter.future.cancel()
                self._leave_queue(waiter)
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                self.timed_out_total += 1
                raise QueueTimeoutError(
                    f"Waited {self.queue_timeout_s:g} s in the queue without a free slot; retry later.",
                    retry_after_s=max(1, math.ceil(self.queue_timeout_s / 4)),
                ) from None
            raise
        return Slot(self, time.monotonic() - started, parties)

    def _refuse(self, limit: str) -> None:
        self.rejected_total += 1
        self.rejected_by[limit] += 1

    def _holding(self, party: Party) -> _Holding:
        holding = self._holdings.get(party)
        if holding is None:
            holding = self._holdings[party] = _Holding()
        return holding

    def _held(self, party: Party) -> _Holding:
        """What ``party`` holds, without remembering a party that holds nothing."""
        return self._holdings.get(party) or _NOTHING

    def _may_run(self, parties: tuple[Party, ...]) -> bool:
        return all(self._held(party).in_flight < self.shares[party[0]].in_flight for party in parties)

    def _start(self, parties: tuple[Party, ...]) -> None:
        self._in_flight += 1
        for party in parties:
            self._holding(party).in_flight += 1

    def _leave_queue(self, waiter: _Waiter) -> None:
        if waiter.queued:
            waiter.queued = False
            for party in waiter.parties:
                self._holding(party).queued -= 1
                self._forget_if_idle(party)

    def _forget_if_idle(self, party: Party) -> None:
        # parties are remembered only while they hold something: memory stays bounded by
        # the requests in flight and queued, however many addresses come and go
        holding = self._holdings.get(party)
        if holding is not None and holding.in_flight == 0 and holding.queued == 0:
            del self._holdings[party]

    def _release(self, parties: tuple[Party, ...]) -> None:
        self._in_flight -= 1
        for party in parties:
            self._holding(party).in_flight -= 1
            self._forget_if_idle(party)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to the oldest waiters whose parties are below their shares."""
        for waiter in list(self._waiters):
            if self._in_flight >= self.max_in_flight:
                return
            if waiter.future.done():
                self._waiters.remove(waiter)
                self._leave_queue(waiter)
                continue
            if self._may_run(waiter.parties):
                self._waiters.remove(waiter)
                self._leave_queue(waiter)
                self._start(waiter.parties)
                waiter.future.set_result(None)


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
