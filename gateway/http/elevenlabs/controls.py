"""ElevenLabs' request -> our speech request: the documented mapping of ``voice_settings``.

ElevenLabs' voice settings describe a cloned voice's delivery; Chatterbox has its own
controls. The mapping keeps ElevenLabs' defaults at Chatterbox's defaults:

================== ========================================== ===================================
ElevenLabs         Chatterbox                                 at ElevenLabs' default
================== ========================================== ===================================
stability (0-1)    exaggeration = (1 - stability) + style     stability 0.5, style 0 -> 0.5
style (0-1)        (added to exaggeration, 0-2)
similarity_boost   cfg_weight = similarity_boost x 2/3        0.75 -> 0.5
speed (0.25-4)     speed (tempo, pitch kept)                  1.0
use_speaker_boost  ignored
seed               seed
language_code      language
================== ========================================== ===================================

A setting left out (or null) leaves its control at the model's default; a control the model
does not honour (Turbo has no exaggeration or CFG) is ignored, as on the OpenAI route.
"""

from __future__ import annotations

from gateway.http.elevenlabs.protocol import VoiceSettings
from gateway.http.protocol import SpeechRequest
from gateway.models.families import Family

DEFAULT_STABILITY = 0.5
DEFAULT_STYLE = 0.0
CFG_PER_SIMILARITY = 2.0 / 3.0
MAX_EXAGGERATION = 2.0


def speech_request(
    *,
    text: str,
    family: Family,
    voice: str,
    language: str | None = None,
    voice_settings: VoiceSettings | None = None,
    seed: int | None = None,
) -> SpeechRequest:
    """The OpenAI-route request that says the same thing (its format is chosen by the caller)."""
    settings = voice_settings or VoiceSettings()
    exaggeration = None
    if settings.stability is not None or settings.style is not None:
        stability = DEFAULT_STABILITY if settings.stability is None else settings.stability
        style = DEFAULT_STYLE if settings.style is None else settings.style
        exaggeration = min(MAX_EXAGGERATION, max(0.0, (1.0 - stability) + style))
    cfg_weight = None if settings.similarity_boost is None else settings.similarity_boost * CFG_PER_SIMILARITY
    return SpeechRequest(
        model=family.id,
        input=text,
        voice=voice,
        language=language,
        speed=1.0 if settings.speed is None else settings.speed,
        exaggeration=exaggeration,
        cfg_weight=cfg_weight,
        seed=seed,
    )
