"""Engine death: a loaded engine that stops working makes the server not ready.

Every engine has ``check_health()`` (``gateway.engine.base.Engine``): it returns when the
engine can serve and raises when it cannot (its worker process died, the device failed; the
vLLM engine asks ``AsyncLLM``, the in-process engines are healthy while the process lives).
While the app runs, :func:`watch_engine` calls it every few seconds and, on the first
failure, marks the engine failed: ``/ready`` then answers 503 and new speech requests get
503 with Retry-After instead of hanging on a dead engine. A load balancer takes the instance
out; an orchestrator restarts it. The check goes on after a failure, and an engine that
passes it again is ready again (the cluster engine, once Ray has replaced its replicas; a
dead vLLM engine core keeps failing).
"""

from __future__ import annotations

import asyncio

import structlog

from gateway.engine.base import Engine
from gateway.server.services import AppServices

HEALTH_INTERVAL_S = 2.0
HEALTH_TIMEOUT_S = 10.0


def mark_engine_dead(services: AppServices, reason: str) -> None:
    if services.engine_state == "ready":
        services.engine_state = "failed"
        services.engine_error = reason
        services.engine_died = True
        structlog.get_logger("gateway.engine").error("engine_died", error=reason)


async def check_engine(services: AppServices, *, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """One health check of a ready engine; False (and the engine marked failed) if it fails."""
    engine = services.engine
    if services.engine_state != "ready" or engine is None:
        return services.engine_state == "ready"
    reason = await _failure(engine, timeout_s)
    if reason is not None:
        mark_engine_dead(services, reason)
    return reason is None


async def _failure(engine: Engine, timeout_s: float) -> str | None:
    """Why the engine cannot serve, or None when its health check passes."""
    try:
        async with asyncio.timeout(timeout_s):
            await engine.check_health()
    except TimeoutError:
        return f"health check did not answer within {timeout_s:g} s"
    except Exception as exc:  # whatever the engine raises means it cannot serve
        return f"{type(exc).__name__}: {exc}"
    return None


async def watch_engine(services: AppServices, *, interval_s: float | None = None) -> None:
    """Check the engine every ``interval_s`` (default HEALTH_INTERVAL_S) until cancelled
    (app shutdown). An engine that died is still checked: one whose check passes again is
    ready again."""
    while services.engine_state in ("loading", "ready"):
        await asyncio.sleep(HEALTH_INTERVAL_S if interval_s is None else interval_s)
        if services.engine_state == "loading":
            continue  # nothing to check yet: an engine that loads for longer is watched once ready
        if not await check_engine(services):
            await _watch_for_recovery(services, interval_s)


async def _watch_for_recovery(services: AppServices, interval_s: float | None) -> None:
    while services.engine_state == "failed" and services.engine is not None:
        await asyncio.sleep(HEALTH_INTERVAL_S if interval_s is None else interval_s)
        if await _failure(services.engine, HEALTH_TIMEOUT_S) is None and services.engine_state == "failed":
            services.engine_state, services.engine_error, services.engine_died = "ready", None, False
            structlog.get_logger("gateway.engine").info("engine_recovered")
            return
