"""GET /metrics: the app's Prometheus metrics (text exposition format).

Left out of the OpenAPI document: it is an operator endpoint, not part of the OpenAI API.
Needs an API key only when ``metrics_require_auth`` is set (see ``gateway.http.auth``).
"""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from gateway.errors import NotFoundError
from gateway.server.services import AppServices


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics(services: NamedDependency[AppServices]) -> Response[bytes]:
    if services.metrics is None:
        raise NotFoundError("Metrics are disabled (metrics_enabled=false).")
    body, content_type = services.metrics.render()
    return Response(content=body, media_type=content_type, headers={"Cache-Control": "no-store"})
