"""GET /v1/voices and /v1/voices/{voice_id}: our voices in ElevenLabs' shape.

The same library as ``/v1/audio/voices``: ``voice_id`` is the voice's id; its name and every
alias work as a ``voice_id`` too (in these routes and in the text-to-speech ones).
"""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.http.elevenlabs.docs import ELEVENLABS_SECURITY, elevenlabs_error_responses
from gateway.http.elevenlabs.protocol import ElevenLabsVoice, ElevenLabsVoices
from gateway.server.services import AppServices
from gateway.voices.library import VoiceInfo, VoiceLibrary
from gateway.errors import EngineUnavailableError
from gateway.server.services import LOADING_RETRY_AFTER_S


@get(
    "/v1/voices",
    tags=["elevenlabs"],
    summary="List voices (ElevenLabs)",
    sync_to_thread=False,
    responses=elevenlabs_error_responses({503: "Voice library loading"}),
    security=ELEVENLABS_SECURITY,
)
def list_voices(services: NamedDependency[AppServices]) -> ElevenLabsVoices:
    """Every voice, in ElevenLabs' `{"voices": [...]}` shape: built-in ones are `premade`, user
    voices `cloned`."""
    return ElevenLabsVoices(voices=[voice_card(info) for info in _library(services).list()])


@get(
    "/v1/voices/{voice_id:str}",
    tags=["elevenlabs"],
    summary="Get a voice (ElevenLabs)",
    sync_to_thread=False,
    responses=elevenlabs_error_responses({404: "No voice has this id, name or alias", 503: "Voice library loading"}),
    security=ELEVENLABS_SECURITY,
)
def get_voice(voice_id: FromPath[str], services: NamedDependency[AppServices]) -> ElevenLabsVoice:
    """One voice by id, name or alias."""
    return voice_card(_library(services).get(voice_id))


def voice_card(info: VoiceInfo) -> ElevenLabsVoice:
    return ElevenLabsVoice(
        voice_id=info.id,
        name=info.name,
        category="cloned" if info.source == "user" else "premade",
        description=info.description or None,
        labels={"source": info.source},
        created_at_unix=info.created_at,
        aliases=list(info.aliases),
    )


def _library(services: AppServices) -> VoiceLibrary:
    if services.voices is None:
        raise EngineUnavailableError("The voice library is loading; retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S)
    return services.voices
