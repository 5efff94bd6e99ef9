"""AdmissionController and next_within on their own (the HTTP-level tests are in tests/http/test_admission_http.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.speech.admission import AdmissionController, QueueTimeoutError, next_within
from gateway.errors import EngineUnavailableError, OverloadedError, RequestTimeoutError


def controller(in_flight: int = 1, queued: int = 0, timeout: float = 5.0) -> AdmissionController:
    return AdmissionController(max_in_flight=in_flight, max_queued=queued, queue_timeout_s=timeout)


async def test_full_queue_refuses_at_once_with_retry_after() -> None:
    admission = controller(in_flight=1, queued=0)
    slot = await admission.acquire()
    started = time.monotonic()
    with pytest.raises(OverloadedError) as info:
        await admission.acquire()
    assert time.monotonic() - started < 0.05
    assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "1"
    assert admission.in_flight == 1 and admission.rejected_total == 1
    slot.release()
    slot.release()  # idempotent: a second release must not free someone else's slot
    assert admission.in_flight == 0


async def test_queued_requests_are_admitted_in_order() -> None:
    admission = controller(in_flight=1, queued=3)
    first = await admission.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        slot = await admission.acquire()
        order.append(i)
        await asyncio.sleep(0)
        slot.release()

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert admission.queued == 3 and admission.in_flight == 1
    with pytest.raises(OverloadedError):
        await admission.acquire()
    first.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert admission.in_flight == 0 and admission.queued == 0


async def test_queue_timeout_is_a_503_and_frees_the_queue_place() -> None:
    admission = controller(in_flight=1, queued=1, timeout=0.1)
    slot = await admission.acquire()
    started = time.monotonic()
    with pytest.raises(QueueTimeoutError) as info:
        await admission.acquire()
    assert 0.09 < time.monotonic() - started < 1.0
    assert info.value.status_code == 503 and "Retry-After" in info.value.headers
    assert admission.queued == 0 and admission.timed_out_total == 1
    slot.release()
    assert admission.in_flight == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    admission = controller(in_flight=1, queued=2)
    slot = await admission.acquire()
    waiter = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0.01)
    # hand over the slot and cancel the waiter in the same loop iteration (the race)
    slot.release()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.in_flight == 0 and admission.queued == 0
    again = await admission.acquire()
    again.release()


async def test_close_refuses_new_and_queued_requests() -> None:
    admission = controller(in_flight=1, queued=2)
    slot = await admission.acquire()
    waiter = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0.01)
    admission.close()
    with pytest.raises(EngineUnavailableError):
        await waiter
    with pytest.raises(EngineUnavailableError):
        await admission.acquire()
    slot.release()
    assert admission.in_flight == 0


async def test_next_within_cancels_a_stuck_producer_at_the_deadline() -> None:
    cancelled = asyncio.Event()

    async def stuck() -> object:
        yield 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield 2

    source = stuck()
    assert await next_within(source, time.monotonic() + 5) == 1
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await next_within(source, time.monotonic() + 0.2)
    assert time.monotonic() - started < 1.0
    assert cancelled.is_set()  # the producer's own cleanup ran
    with pytest.raises(RequestTimeoutError):  # a deadline already past: no wait at all
        await next_within(source, time.monotonic() - 1)


async def test_next_within_passes_everything_through_in_time() -> None:
    async def quick() -> object:
        for i in range(5):
            await asyncio.sleep(0)
            yield i

    source = quick()
    got = [await next_within(source, time.monotonic() + 5) for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(StopAsyncIteration):
        await next_within(source, time.monotonic() + 5)
