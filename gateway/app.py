"""The app factory: every route, dependency, hook and the lifespan, wired explicitly.

``create_app`` touches no GPU and downloads nothing (the OpenAPI export and the HTTP tests
run anywhere). The engine is built and loaded in the lifespan, in the background, so that
/health answers at once while /ready and the speech endpoint say 503 until it is ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from gateway import __version__
from gateway.audio.encoder import warm_up as warm_up_encoder
from gateway.http.api_docs import api_docs_assets, render_plugins
from gateway.http.errors import handle_exception
from gateway.http.health import health, health_head, ready, ready_head
from gateway.http.metrics import metrics
from gateway.http.models import list_models, retrieve_model
from gateway.http.playground import playground_routes
from gateway.http.response_guard import response_guard
from gateway.http.request_context import add_request_id_header, request_context_middleware
from gateway.http.speech import create_speech
from gateway.http.voices import VoicesController, upload_body_limit
from gateway.http.auth import KEY_CHECKER_STATE, auth_middleware, log_auth_mode
from gateway.http.elevenlabs.routes import elevenlabs_router
from gateway.http.elevenlabs.docs import XI_API_KEY_SCHEME, xi_api_key_scheme
from gateway.http.elevenlabs.face import FACE_STATE, ElevenLabsFace
from gateway.http.cors import cors_config
from gateway.engine.base import Engine
from gateway.engine.factory import build_engine
from gateway.server.engine_watch import watch_engine
from gateway.observability.loop_lag import watch_loop_lag
from gateway.observability.metrics import GatewayMetrics, service_gauges
from gateway.server.services import AppServices, provide_services
from gateway.settings import Settings
from gateway.server.http_server import SHUTDOWN_CLOCK_STATE
from gateway.server.shutdown import ShutdownClock, close_engine, drain
from gateway.voices.cache import VoiceCache
from gateway.voices.clip_probe import DecodeLimits
from gateway.voices.library import VoiceLibrary

OPENAPI_PATH = "/schema"
"""The live server serves the OpenAPI document at ``/schema/openapi.json``."""


def create_app(settings: Settings, *, engine: Engine | None = None) -> Litestar:
    """The gateway as an ASGI app. ``engine`` replaces the configured one (tests)."""
    api_keys = auth_middleware(settings)
    services = AppServices(settings=settings, key_count=api_keys.checker.count)
    shutdown_clock = ShutdownClock(settings.shutdown_grace_s)

    # voice uploads get their own body limit (a clip is far larger than a speech request)
    voices_router = Router(
        path="/",
        route_handlers=[VoicesController],
        request_max_body_size=upload_body_limit(settings),
    )
    if settings.metrics_enabled:
        services.metrics = GatewayMetrics(
            live=lambda: service_gauges(services),
            engine=lambda: services.engine,
            refusals=lambda: services.admission.rejected_by,
            connections=lambda: services.connection_stats() if services.connection_stats is not None else None,
        )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        log_auth_mode(api_keys)
        loader = asyncio.create_task(_load(services, engine), name="engine-loader")
        watcher = asyncio.create_task(watch_engine(services), name="engine-watch")
        tasks = [loader, watcher]
        if services.metrics is not None and settings.loop_lag_probe_s > 0:
            tasks.append(asyncio.create_task(
                watch_loop_lag(services.metrics.loop_lag.observe, settings.loop_lag_probe_s), name="loop-lag"))
        try:
            yield
        finally:
            # stop admitting and let admitted work finish within what is left of the grace
            # (the server has spent part of it on open connections), then release the device
            await drain(services, shutdown_clock.remaining())
            services.engine_state = "closed"
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_engine(services)

    route_handlers: list[Any] = [
        create_speech, list_models, retrieve_model, voices_router, health, health_head, ready, ready_head, metrics,
        api_docs_assets(),
    ]
    if settings.playground_enabled:
        route_handlers += playground_routes()
    # the ElevenLabs face (voice agents): same services, its own wire shapes
    state: dict[str, Any] = {KEY_CHECKER_STATE: api_keys.checker}
    if settings.elevenlabs_enabled:
        route_handlers.append(elevenlabs_router())
        state[FACE_STATE] = ElevenLabsFace(services, api_keys.checker)

    return Litestar(
        route_handlers=route_handlers,
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers={Exception: handle_exception},
        lifespan=[lifespan],
        middleware=[request_context_middleware, response_guard(settings), api_keys],
        cors_config=cors_config(settings),
        before_send=[add_request_id_header],
        request_max_body_size=settings.max_body_bytes,
        state=State({"services": services, SHUTDOWN_CLOCK_STATE: shutdown_clock, **state}),
        openapi_config=OpenAPIConfig(
            title="chatterbox-gateway",
            version=__version__,
            description="OpenAI-compatible text-to-speech for Resemble AI's Chatterbox models.",
            path=OPENAPI_PATH,
            render_plugins=render_plugins(),
            components=Components(
                security_schemes={
                    "BearerAuth": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An API key, when the server has keys configured; otherwise any value.",
                    ),
                    XI_API_KEY_SCHEME: xi_api_key_scheme(),
                }
            ),
        ),
        logging_config=None,
    )


async def _load(services: AppServices, engine: Engine | None) -> None:
    """Build and start the engine, then the voice library and cache; record failure, never raise."""
    log = structlog.get_logger("gateway.app")
    settings = services.settings
    try:
        services.voices = VoiceLibrary(
            settings.resolved_builtin_voices_dir(),
            settings.resolved_voices_dir(),
            max_clip_bytes=settings.max_upload_bytes,
            max_created=settings.max_created_voices,
            max_consent_chars=settings.max_consent_chars,
            decode_limits=DecodeLimits(
                memory_bytes=settings.upload_decode_memory_bytes,
                cpu_s=settings.upload_decode_cpu_s,
                timeout_s=settings.upload_decode_timeout_s,
                min_sample_rate=settings.upload_min_sample_rate,
                max_sample_rate=settings.upload_max_sample_rate,
                max_channels=settings.upload_max_channels,
            ),
        )
        if engine is None:
            # Building may import torch and read config files: keep it off the event loop.
            engine = await asyncio.to_thread(build_engine, settings)
        services.engine = engine
        log.info("engine_loading", engine=engine.name)
        # the encoder's one-time set-up (PyAV's import, codec tables) here, not in a first byte
        await asyncio.to_thread(warm_up_encoder, settings.audio_encoder)
        await engine.start()

        services.voice_cache = VoiceCache(engine, Path(settings.cache_dir) / "conditionals", settings.voice_cache_size)
        services.engine_state = "ready"
        log.info("engine_ready", engine=engine.name, model=engine.model_id)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any failure to load is reported by /ready, not raised into the server
        services.engine_state = "failed"
        services.engine_error = f"{type(exc).__name__}: {exc}"
        log.exception("engine_failed", error=services.engine_error)
