"""/v1/audio/voices: the voices a request may name, with their aliases."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from gateway.errors import EngineUnavailableError
from gateway.protocol import VoiceCard, VoiceList
from gateway.services import LOADING_RETRY_AFTER_S, AppServices


class VoicesController(Controller):
    path = "/v1/audio/voices"
    tags = ["voices"]

    @get(summary="List voices", sync_to_thread=False)
    def list_voices(self, services: NamedDependency[AppServices]) -> VoiceList:
        """Every voice: built-in ones (the 13 OpenAI names are aliases of them), the model's own
        voice and user voices. `id`, `name` and every alias can be sent as `voice`."""
        if services.voices is None:
            raise EngineUnavailableError("The voice library is loading; retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S)
        return VoiceList(
            data=[
                VoiceCard(id=info.id, name=info.name, aliases=list(info.aliases), source=info.source)
                for info in services.voices.list()
            ]
        )
