"""Which paths belong to the ElevenLabs face (their errors take its shape)."""

from __future__ import annotations

TTS_PREFIX = "/v1/text-to-speech/"
VOICES_PATH = "/v1/voices"


def is_elevenlabs_path(path: str) -> bool:
    return path.startswith(TTS_PREFIX) or path == VOICES_PATH or path.startswith(VOICES_PATH + "/")
