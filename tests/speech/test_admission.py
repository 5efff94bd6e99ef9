"""AdmissionController and next_within on their own (the HTTP-level tests are in tests/http/test_admission_http.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.speech.admission import AdmissionController, QueueTimeoutError, next_within
from gateway.errors import EngineUnavailableError, OverloadedError, RequestTimeoutError
from ops_support import quiet_attempts


def controller(in_flight: int = 1, queued: int = 0, timeout: float = 5.0) -> AdmissionController:
    return AdmissionController(max_in_flight=in_flight, max_queued=queued, queue_timeout_s=timeout)


async def test_full_queue_refuses_at_once_with_retry_after() -> None:
    admission = controller(in_flight=1, queued=0)
    slot = await admission.acquire()
    others_ran: list[bool] = []
    asyncio.get_running_loop().call_soon(others_ran.append, True)
    with pytest.raises(OverloadedError) as info:
        await admission.acquire()
    assert others_ran == []  # refused without yielding to the event loop: no wait at all
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
    for _ in quiet_attempts():  # the upper bound is wall time: a stalled host measures again
        admission = controller(in_flight=1, queued=1, timeout=0.1)
        slot = await admission.acquire()
        started = time.monotonic()
        with pytest.raises(QueueTimeoutError) as info:
            await admission.acquire()
        took = time.monotonic() - started
    assert 0.09 < took < 1.0, took  # at its own 0.1 s, not the default 5
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

    for _ in quiet_attempts():  # the upper bound is wall time: a stalled host measures again
        cancelled.clear()
        source = stuck()
        assert await next_within(source, time.monotonic() + 5) == 1
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await next_within(source, time.monotonic() + 0.2)
        took = time.monotonic() - started
    assert 0.15 < took < 1.0, took
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


# ---- fair shares: per client and per key -----------------------------------------------------

from gateway.speech.admission import Share, ShareLimitError  # noqa: E402


def shared(in_flight: int, queued: int, *, client: float = 1.0, key: float = 1.0) -> AdmissionController:
    return AdmissionController(
        max_in_flight=in_flight, max_queued=queued, queue_timeout_s=5.0, client_share=client, key_share=key
    )


@pytest.mark.parametrize(
    ("fraction", "in_flight", "queued", "expected"),
    [(0.25, 32, 64, (8, 16)), (0.25, 4, 4, (1, 1)), (0.25, 1, 0, (1, 0)), (0.1, 30, 10, (3, 1)), (1.0, 5, 7, (5, 7))],
)
def test_a_share_is_rounded_up_and_never_below_one_slot(fraction, in_flight, queued, expected) -> None:
    share = Share.of(fraction, in_flight, queued)
    assert (share.in_flight, share.queued) == expected


async def test_a_client_at_its_share_waits_while_others_pass() -> None:
    admission = shared(4, 4, client=0.25)  # a client: 1 in flight, 1 waiting
    mine = await admission.acquire(client="a")
    waiting = asyncio.create_task(admission.acquire(client="a"))
    await asyncio.sleep(0.01)
    assert not waiting.done() and admission.in_flight == 1 and admission.queued == 1  # 3 slots free, still waits
    with pytest.raises(ShareLimitError) as info:
        await admission.acquire(client="a")
    assert info.value.status_code == 429 and info.value.code == "client_concurrency_limit"
    assert info.value.headers["Retry-After"] == "1" and "max_client_share" in info.value.message
    others = [await admission.acquire(client=name) for name in ("b", "c", "d")]  # pass the waiter at once
    assert admission.in_flight == 4
    mine.release()  # its own slot frees: its waiter runs
    second = await asyncio.wait_for(waiting, 1)
    assert admission.held_by("client", "a") == (1, 0)
    for slot in (second, *others):
        slot.release()
    assert admission.in_flight == 0 and admission._holdings == {}
    assert admission.rejected_by == {"client": 1}


async def test_a_full_server_is_server_overloaded_whoever_asks() -> None:
    admission = shared(1, 0, client=0.25)
    slot = await admission.acquire(client="a")
    for who in ("a", "b"):
        with pytest.raises(OverloadedError) as info:
            await admission.acquire(client=who)
        assert info.value.code == "server_overloaded"
    slot.release()


async def test_the_queue_stays_fifo_among_those_who_may_run() -> None:
    admission = shared(2, 6, client=0.5)  # a client: 1 in flight, 3 waiting
    a1 = await admission.acquire(client="a")
    b1 = await admission.acquire(client="b")
    order: list[str] = []

    async def wait(who: str) -> None:
        slot = await admission.acquire(client=who)
        order.append(who)
        await asyncio.sleep(0.01)
        slot.release()

    tasks = [asyncio.create_task(wait(who)) for who in ("a", "a", "c", "b", "c")]
    await asyncio.sleep(0.01)
    b1.release()  # a is still at its share: the first waiter that may run is c
    await asyncio.sleep(0.005)
    assert order == ["c"]
    a1.release()
    await asyncio.gather(*tasks)
    assert sorted(order) == ["a", "a", "b", "c", "c"] and order.index("a") < order.index("b")
    assert admission.in_flight == 0 and admission.queued == 0 and admission._holdings == {}


async def test_keys_have_shares_of_their_own() -> None:
    admission = shared(4, 0, key=0.5)  # a key: 2 in flight, none waiting
    slots = [await admission.acquire(client=f"10.0.0.{i}", key="key_a") for i in range(2)]
    with pytest.raises(ShareLimitError) as info:
        await admission.acquire(client="10.0.0.9", key="key_a")  # a third address, the same key
    assert info.value.code == "key_concurrency_limit"
    other = await admission.acquire(client="10.0.0.9", key="key_b")
    for slot in (*slots, other):
        slot.release()
    assert admission.rejected_by == {"key": 1}


async def test_a_cancelled_or_timed_out_waiter_gives_its_share_back() -> None:
    admission = AdmissionController(max_in_flight=1, max_queued=4, queue_timeout_s=0.05, client_share=0.5)
    slot = await admission.acquire(client="a")
    with pytest.raises(QueueTimeoutError):
        await admission.acquire(client="a")
    waiter = asyncio.create_task(admission.acquire(client="a"))
    await asyncio.sleep(0.01)
    assert admission.held_by("client", "a") == (1, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.held_by("client", "a") == (1, 0)
    slot.release()
    assert admission._holdings == {} and admission.in_flight == 0


async def test_a_slot_handed_over_as_its_waiter_leaves_goes_to_the_next() -> None:
    admission = shared(1, 4, client=0.5)
    slot = await admission.acquire(client="a")
    leaving = asyncio.create_task(admission.acquire(client="b"))
    staying = asyncio.create_task(admission.acquire(client="c"))
    await asyncio.sleep(0.01)
    slot.release()  # hands the slot to b's waiter ...
    leaving.cancel()  # ... which is cancelled in the same loop iteration
    with pytest.raises(asyncio.CancelledError):
        await leaving
    third = await asyncio.wait_for(staying, 1)
    assert admission.in_flight == 1 and admission.held_by("client", "c") == (1, 0)
    third.release()
    assert admission._holdings == {} and admission.in_flight == 0
