"""Liveness and readiness: /health says the process answers, /ready that the engine is loaded.

Both also answer HEAD (some probes and load balancers send it): the same status, no body.
"""

from __future__ import annotations

from litestar import get, head
from litestar.di import NamedDependency

from gateway.http.errors import error_responses
from gateway.http.protocol import HealthStatus
from gateway.server.services import AppServices


@get("/health", tags=["health"], summary="The process is up", sync_to_thread=False)
def health() -> HealthStatus:
    """Always 200 while the process serves HTTP, also while the engine loads."""
    return HealthStatus(status="ok")


@get(
    "/ready",
    tags=["health"],
    summary="The engine is loaded",
    sync_to_thread=False,
    responses=error_responses({503: "Engine loading or failed (Retry-After set)"}),
)
def ready(services: NamedDependency[AppServices]) -> HealthStatus:
    """200 once the engine has loaded; 503 with the error envelope and Retry-After until then."""
    engine = services.ready_engine()
    return HealthStatus(status="ready", engine=engine.name, model=engine.model_id)


@head("/health", include_in_schema=False, sync_to_thread=False)
def health_head() -> None:
    return None


@head("/ready", include_in_schema=False, sync_to_thread=False)
def ready_head(services: NamedDependency[AppServices]) -> None:
    services.ready_engine()  # 503 (Retry-After) until the engine has loaded, like GET
