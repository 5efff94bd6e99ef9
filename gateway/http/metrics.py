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
    # as a header, not media_type: Litestar appends "; charset=utf-8" to a text/* media type,
    # and Prometheus' content type already ends with it
    return Response(content=body, headers={"content-type": content_type, "Cache-Control": "no-store"})
