"""CORS, so a browser page on another origin can call the API. Off unless origins are set.

Browsers send a preflight ``OPTIONS`` without credentials; it is answered here and never
needs an API key (``gateway.http.auth`` lets it through). The real request then carries
``Authorization`` like any other client. ``x-request-id`` and ``Retry-After`` are exposed so
a page can read them.
"""

from __future__ import annotations

from litestar.config.cors import CORSConfig

from gateway.settings import Settings

PREFLIGHT_MAX_AGE_S = 600


def cors_config(settings: Settings) -> CORSConfig | None:
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        # any header: the OpenAI JS SDK in a browser sends its own x-stainless-* headers
        allow_headers=["*"],
        expose_headers=["x-request-id", "Retry-After"],
        # Bearer tokens travel in a header the page sets itself; cookies are never used.
        allow_credentials=False,
        max_age=PREFLIGHT_MAX_AGE_S,
    )
