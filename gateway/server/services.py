"""What a request handler may use, gathered in one object that lives on ``app.state``.

The app lifespan fills it (engine, voices) and empties it; handlers receive it through the
``services`` dependency. Nothing here is global: every app has its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from litestar.datastructures import State

from gateway.speech.admission import AdmissionController
from gateway.engine.base import Engine, EngineState
from gateway.errors import EngineUnavailableError
from gateway.settings import Settings
from gateway.speech.model_names import ModelNames

if TYPE_CHECKING:
    from gateway.observability.metrics import GatewayMetrics
    from gateway.voices.cache import VoiceCache
    from gateway.voices.library import VoiceLibrary

# How long a client should wait before asking again while the engine loads.
LOADING_RETRY_AFTER_S = 5


class AppServices:
    """Deliberately a plain class (not a dataclass): Litestar resolves the field types of
    structured dependency types, and the voice types are only imported for type checkers."""

    def __init__(self, settings: Settings, *, key_count: int = 0) -> None:
        self.settings = settings
        self.model_names = ModelNames(settings.models, settings.model_aliases)
        """The loaded model families and the names (aliases) that reach them."""
        self.engine: Engine | None = None
        self.engine_state: EngineState = "loading"
        self.engine_error: str | None = None
        """Why the engine failed to load or stopped working (shown by /ready and on 503s)."""
        self.engine_died = False
        """The engine had loaded and then failed its health check (``engine_watch``): /ready
        says it stopped working, not that it failed to load."""
        self.voices: VoiceLibrary | None = None
        self.voice_cache: VoiceCache | None = None
        self.admission = AdmissionController.from_settings(settings, key_count=key_count)
        """Bounded in-flight speech work, fairly shared by clients and (``key_count`` >= 2) API
        keys (429/503 past it); see gateway.speech.admission."""
        self.upload_admission = AdmissionController.for_uploads(settings)
        """Bounded voice-clip processing (FFmpeg decode + FLAC write per upload)."""
        self.metrics: GatewayMetrics | None = None
        """The app's Prometheus metrics; None when metrics_enabled is off."""
        self.connection_stats: Callable[[], dict[str, tuple[str, str, float]]] | None = None
        """The serving connections' gauges and counters, ``{name: (kind, help, value)}``
        (``gateway.server.http_server`` sets it; None without the guarded server)."""

    def ready_engine(self) -> Engine:
        """The engine, or a 503 (with Retry-After) while it loads or after it failed."""
        if self.engine_state == "ready" and self.engine is not None:
            return self.engine
        raise EngineUnavailableError(self.unavailable_message(), retry_after_s=LOADING_RETRY_AFTER_S)

    def ready_voices(self) -> tuple[VoiceLibrary, VoiceCache]:
        self.ready_engine()
        if self.voices is None or self.voice_cache is None:
            raise EngineUnavailableError(self.unavailable_message(), retry_after_s=LOADING_RETRY_AFTER_S)
        return self.voices, self.voice_cache

    def unavailable_message(self) -> str:
        if self.engine_state == "failed" and self.engine_died:
            return (
                f"The speech engine stopped working: {self.engine_error}. The server checks it every few "
                "seconds and is ready again as soon as it works."
            )
        if self.engine_state == "failed":
            return f"The speech engine failed to load: {self.engine_error}"
        if self.engine_state == "closed":
            return "The server is shutting down."
        return "The speech engine is loading; retry shortly."


def provide_services(state: State) -> AppServices:
    """Litestar dependency: the app's services object."""
    services: AppServices = state.services
    return services
