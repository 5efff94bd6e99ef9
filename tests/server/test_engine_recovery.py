"""An engine whose health check passes again after a failure (the cluster engine once Ray has
replaced its replicas) makes the server ready again; one that keeps failing stays failed."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engine.fake import FakeEngine
from gateway.server.engine_watch import watch_engine
from gateway.server.services import AppServices
from gateway.settings import Settings


class FlakyEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        self.checks = 0

    async def check_health(self) -> None:
        self.checks += 1
        if not self.healthy:
            raise RuntimeError("no engine replica is running")


async def wait_for(predicate, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture
async def watched(settings: Settings):  # type: ignore[no-untyped-def]
    engine = FlakyEngine()
    services = AppServices(settings)
    services.engine, services.engine_state = engine, "ready"
    task = asyncio.create_task(watch_engine(services, interval_s=0.01))
    try:
        yield services, engine
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_engine_that_recovers_is_ready_again(watched) -> None:  # type: ignore[no-untyped-def]
    services, engine = watched
    engine.healthy = False
    assert await wait_for(lambda: services.engine_state == "failed")
    assert "no engine replica" in (services.engine_error or "")
    # what /ready and every 503 say: it had loaded and stopped, it did not fail to load
    said = services.unavailable_message()
    assert said.startswith("The speech engine stopped working: ") and "ready again" in said, said
    engine.healthy = True
    assert await wait_for(lambda: services.engine_state == "ready")
    assert services.engine_error is None and not services.engine_died


async def test_an_engine_that_stays_dead_stays_failed(watched) -> None:  # type: ignore[no-untyped-def]
    services, engine = watched
    engine.healthy = False
    assert await wait_for(lambda: services.engine_state == "failed")
    checks = engine.checks
    assert await wait_for(lambda: engine.checks > checks + 5)  # still watched ...
    assert services.engine_state == "failed"  # ... and still failed


async def test_shutdown_ends_the_watch_of_a_failed_engine(watched) -> None:  # type: ignore[no-untyped-def]
    services, engine = watched
    engine.healthy = False
    assert await wait_for(lambda: services.engine_state == "failed")
    services.engine_state = "closed"
    engine.healthy = True
    await asyncio.sleep(0.1)
    assert services.engine_state == "closed"
