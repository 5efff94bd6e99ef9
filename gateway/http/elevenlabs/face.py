"""What the ElevenLabs face keeps per app: its model ids, the key checker, the open sockets.

Built in ``create_app`` and kept on ``app.state`` (:data:`FACE_STATE`); nothing global.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import EngineUnavailableError
from gateway.http.auth import KeyChecker
from gateway.http.elevenlabs.model_ids import ElevenLabsModels
from gateway.observability.metrics import GatewayMetrics
from gateway.server.services import AppServices

FACE_STATE = "elevenlabs"
SOCKETS_RETRY_AFTER_S = 1


class ElevenLabsFace:
    def __init__(self, services: AppServices, keys: KeyChecker) -> None:
        self.services = services
        self.keys = keys
        settings = services.settings
        self.models = ElevenLabsModels(services.model_names, settings.elevenlabs_model_aliases)
        self.max_sockets = settings.elevenlabs_max_sockets
        self.open_sockets = 0
        self.open_contexts = 0
        if services.metrics is not None:
            services.metrics.add_gauges(self._gauges)

    @property
    def metrics(self) -> GatewayMetrics | None:
        return self.services.metrics

    def open_socket(self) -> None:
        """Count a new socket in, or refuse it (503, Retry-After) at ``elevenlabs_max_sockets``."""
        if self.open_sockets >= self.max_sockets:
            raise EngineUnavailableError(
                f"Too many text-to-speech WebSockets open ({self.max_sockets}); retry shortly.",
                retry_after_s=SOCKETS_RETRY_AFTER_S,
                code="too_many_sockets",
            )
        self.open_sockets += 1

    def close_socket(self) -> None:
        self.open_sockets -= 1

    def _gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "websockets_open": ("Text-to-speech WebSockets open (ElevenLabs face).", float(self.open_sockets)),
            "websocket_contexts_open": ("Speech contexts open on those sockets.", float(self.open_contexts)),
        }


def face_of(app: Any) -> ElevenLabsFace:
    face: ElevenLabsFace = app.state[FACE_STATE]
    return face
