"""Graceful shutdown: stop accepting, let in-flight speech finish within a deadline, then
close the engine (which cancels whatever is left and releases the device).

Under uvicorn (``chatterbox-gateway serve``) the order on SIGTERM/SIGINT is:

1. uvicorn stops listening: new connections are refused;
2. it waits up to ``shutdown_grace_s`` (``timeout_graceful_shutdown``) for open requests;
   streams still running then are cancelled, which closes their body iterators: the engine
   job is aborted and the FFmpeg process killed, as for a client that hung up;
3. the app lifespan ends: :func:`drain` (a no-op by then, unless another server skipped
   step 2) and ``engine.close()``.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from gateway.server.services import AppServices

POLL_S = 0.05


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
