"""/v1/audio/voices: the voices a request may name, with their aliases; and the voice
library API in OpenAI's custom-voices shape: create from a clip (multipart), show, delete.

Each API key sees the shared voices (built-in, dropped-in, created without a key) and the
voices it created; another key's voice answers exactly as a voice that does not exist (404 here,
400 ``voice`` in a speech request). An admin key (``admin_api_keys``) sees them all.

Uploads are limited twice: the whole multipart body by the route's body limit (Litestar,
before the handler runs: ``max_upload_bytes`` plus room for the form framing), the clip
itself by the voice library (``max_upload_bytes``); both answer 413. The library decodes the
clip with FFmpeg and rejects what is not audio, too short or too long (400), unsafe names
(400) and taken names (409), and writes atomically; nothing a request sends becomes a path.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath

from gateway.http.caller import caller_of
from gateway.http.errors import BEARER_SECURITY, v1_error_responses
from gateway.errors import EngineUnavailableError
from gateway.http.protocol import AudioVoice, AudioVoiceDeleted, VoiceCard, VoiceList
from gateway.server.services import LOADING_RETRY_AFTER_S, AppServices

if TYPE_CHECKING:
    from gateway.voices.library import VoiceInfo, VoiceLibrary

MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Room for the form framing and the small text fields around a clip of the maximum size."""


@dataclass
class VoiceUpload:
    """``POST /v1/audio/voices`` form (multipart/form-data)."""

    name: str
    """1-64 characters from A-Z, a-z, 0-9, '_' and '-'; unique (case-insensitive)."""
    audio_sample: UploadFile
    """A reference clip (WAV, FLAC, MP3, Ogg/Opus, AAC, M4A, WebM, AIFF), 3 to 30 s, at most
    max_upload_bytes (10 MiB by default)."""
    consent: str | None = None
    """Optional consent reference, stored with the voice."""


class VoicesController(Controller):
    path = "/v1/audio/voices"
    tags = ["voices"]
    security = BEARER_SECURITY

    @get(summary="List voices", sync_to_thread=False, responses=v1_error_responses({503: "Voice library loading"}))
    def list_voices(self, request: Request[Any, Any, Any], services: NamedDependency[AppServices]) -> VoiceList:
        """Every voice this key may use: built-in ones (the 13 OpenAI names are aliases of them),
        the model's own voice, dropped-in voices and the voices this key created. `id`, `name`
        and every alias can be sent as `voice`."""
        if services.voices is None:
            raise EngineUnavailableError("The voice library is loading; retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S)
        return VoiceList(
            data=[
                VoiceCard(id=info.id, name=info.name, aliases=list(info.aliases), source=info.source)
                for info in services.voices.list(caller_of(request.scope).voices)
            ]
        )

    @post(
        summary="Create a voice",
        status_code=200,
        responses=v1_error_responses(
            {
                400: "Not audio, too short or too long, silent, or an unsafe name (`param` says which)",
                409: "A voice with this name exists",
                413: "Clip larger than max_upload_bytes",
                429: "Too many uploads being processed; retry after Retry-After",
                503: "Voice library loading",
            }
        ),
    )
    async def create_voice(
        self,
        request: Request[Any, Any, Any],
        data: Annotated[VoiceUpload, Body(media_type=RequestEncodingType.MULTI_PART)],
        services: NamedDependency[AppServices],
    ) -> AudioVoice:
        """A voice from a reference clip (6-10 s of clean speech works best), owned by this API
        key. Use it in speech requests by its `id` (`voice: {"id": ...}`) or its `name`."""
        voices = _library(services)
        access = caller_of(request.scope).voices
        async with await services.upload_admission.acquire():  # 429 at once past the queue
            clip = await data.audio_sample.read()
            await data.audio_sample.close()
            # FFmpeg decoding and fsync block: off the event loop
            info = await asyncio.to_thread(functools.partial(voices.create, access=access), data.name, clip, data.consent)
        return _audio_voice(info)

    @get(
        "/{voice_id:str}",
        summary="Retrieve a voice",
        sync_to_thread=False,
        responses=v1_error_responses({404: "No voice this key may use has this id, name or alias", 503: "Voice library loading"}),
    )
    def retrieve_voice(
        self, request: Request[Any, Any, Any], voice_id: FromPath[str], services: NamedDependency[AppServices]
    ) -> AudioVoice:
        """One voice by id, name or alias."""
        return _audio_voice(_library(services).get(voice_id, caller_of(request.scope).voices))

    @delete(
        "/{voice_id:str}",
        summary="Delete a voice",
        status_code=200,
        responses=v1_error_responses(
            {
                400: "A built-in or dropped-in voice (not deletable through the API)",
                403: "A voice created without a key (shared): only an admin key may delete it",
                404: "No voice this key may use has this id or name",
                503: "Voice library loading",
            }
        ),
    )
    async def delete_voice(
        self, request: Request[Any, Any, Any], voice_id: FromPath[str], services: NamedDependency[AppServices]
    ) -> AudioVoiceDeleted:
        """Delete a voice this key created through this API, by its id or name (as GET finds it)."""
        removed = await asyncio.to_thread(_library(services).delete, voice_id, caller_of(request.scope).voices)
        return AudioVoiceDeleted(id=removed.id)


def _library(services: AppServices) -> VoiceLibrary:
    if services.voices is None:
        raise EngineUnavailableError("The voice library is loading; retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S)
    return services.voices


def _audio_voice(info: VoiceInfo) -> AudioVoice:
    return AudioVoice(
        id=info.id,
        name=info.name,
        created_at=info.created_at or 0,
        aliases=list(info.aliases),
        source=info.source,
    )
