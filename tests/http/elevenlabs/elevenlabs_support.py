"""Shared by the ElevenLabs-face tests: the server's settings, how long the fake engine's audio
for a text is (so lengths can be checked exactly), and a small WebSocket client session."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import websockets

from gateway.engine.fake import SAMPLES_PER_TOKEN, TOKENS_PER_CHAR
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO
from gateway.settings import Settings
from gateway.speech.service import speech_chunks

ALL_MODELS = (ORIGINAL, TURBO, MULTILINGUAL)
KEY = "sk-elevenlabs-test-key"


def face_settings(settings: Settings, **changes: Any) -> Settings:
    """All three families loaded, chunks of up to 200 speech tokens (8 s), plus ``changes``."""
    return msgspec.structs.replace(settings, **{"models": ALL_MODELS, "max_speech_tokens": 200, **changes})


def fake_samples(text: str, settings: Settings, family: str = ORIGINAL) -> int:
    """Samples (24 kHz) the fake engine makes for ``text`` said as one chunk."""
    chunks = speech_chunks(text, FAMILIES[family], settings.max_chunk_chars)
    tokens = sum(max(1, min(settings.max_speech_tokens, round(len(c) * TOKENS_PER_CHAR))) for c in chunks)
    return tokens * SAMPLES_PER_TOKEN


def job_samples(engine: Any, request_id: str, max_speech_tokens: int = 200) -> int:
    """Samples the fake engine made for every job of one request (or socket) so far."""
    jobs = [job for job in engine.jobs if job.request_id.startswith(request_id)]
    return sum(engine.speech_tokens_for(chunk, max_speech_tokens) for job in jobs for chunk in job.chunks) * SAMPLES_PER_TOKEN


def ws_url(base_url: str, voice: str = "alloy", *, multi: bool = False, **query: Any) -> str:
    endpoint = "multi-stream-input" if multi else "stream-input"
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return base_url.replace("http://", "ws://") + f"/v1/text-to-speech/{voice}/{endpoint}" + (f"?{params}" if params else "")


@dataclass
class Received:
    """Everything a socket sent, in order, split by kind."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def audio(self, context: str | None = None) -> bytes:
        import base64

        return b"".join(
            base64.b64decode(m["audio"]) for m in self.messages if m.get("audio") and m.get("contextId") == context
        )

    def alignments(self, context: str | None = None, key: str = "alignment") -> list[dict[str, Any]]:
        return [m[key] for m in self.messages if m.get(key) and m.get("contextId") == context]

    def finals(self) -> list[str | None]:
        return [m.get("contextId") for m in self.messages if m.get("isFinal") is True]

    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "error" in m]


async def read_until_closed(ws: websockets.ClientConnection, received: Received, timeout_s: float = 20.0) -> Received:
    """Every message until the server closes the socket."""
    async with asyncio.timeout(timeout_s):
        try:
            async for raw in ws:
                assert isinstance(raw, str), "the server sends text frames only"
                received.messages.append(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
    received.close_code, received.close_reason = ws.close_code, ws.close_reason or ""
    return received


async def read_until(ws: websockets.ClientConnection, received: Received, predicate, timeout_s: float = 20.0) -> dict[str, Any]:
    """Messages until one satisfies ``predicate`` (returned)."""
    async with asyncio.timeout(timeout_s):
        while True:
            message = json.loads(await ws.recv())
            received.messages.append(message)
            if predicate(message):
                return message


async def send(ws: websockets.ClientConnection, **message: Any) -> None:
    await ws.send(json.dumps(message))
