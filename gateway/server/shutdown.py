"""Graceful shutdown: stop accepting, let in-flight speech finish within a deadline, then
close the engine (which cancels whatever is left and releases the device).

Under uvicorn (``chatterbox-gateway serve``) the order on SIGTERM/SIGINT is:

1. uvicorn stops listening: new connections are refused; idle connections are closed;
   the :class:`ShutdownClock` starts;
2. open requests get ``shutdown_grace_s`` in total. A response still running at
   ``ShutdownClock.abort_in`` (the grace less a short margin) has its connection dropped
   (:mod:`gateway.http.connection_guard`): the app sees a disconnect and closes the body
   iterator, so the engine job is aborted and FFmpeg killed exactly as for a client that
   hung up, without a cancelled task's traceback, and a slow reader cannot stretch it;
3. the app lifespan ends: :func:`drain` waits for admitted work for what is left of the
   grace (a no-op by then, unless another server skipped step 2), then ``engine.close()``.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from gateway.server.services import AppServices

POLL_S = 0.05
ABORT_MARGIN_S = 1.0
"""Time kept at the end of the grace for cancelled streams to clean up (at most a quarter of it)."""


class ShutdownClock:
    """When shutdown began, shared by the server (which starts it) and the lifespan (which
    spends what is left of the grace)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.started_at: float | None = None

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def remaining(self) -> float:
        if self.started_at is None:
            return self.grace_s
        return max(0.0, self.grace_s - (time.monotonic() - self.started_at))

    def abort_in(self) -> float:
        """Seconds from now until running responses are dropped."""
        return max(0.0, self.remaining() - min(ABORT_MARGIN_S, self.grace_s / 4))


async def drain(services: AppServices, grace_s: float) -> bool:
    """Refuse new/queued work and wait for admitted work; True when everything finished."""
    log = structlog.get_logger("gateway.server.shutdown")
    admission = services.admission
    admission.close()
    deadline = time.monotonic() + grace_s
    while admission.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    if admission.in_flight:
        log.warning("shutdown_grace_exceeded", in_flight=admission.in_flight, grace_s=grace_s)
        return False
    log.info("shutdown_drained")
    return True


async def close_engine(services: AppServices) -> None:
    engine = services.engine
    if engine is None:
        return
    started = time.monotonic()
    await engine.close()
    structlog.get_logger("gateway.server.shutdown").info(
        "engine_closed", engine=engine.name, close_ms=round((time.monotonic() - started) * 1000, 1)
    )
