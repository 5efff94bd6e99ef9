"""The speech service's one body pipeline, driven directly (no HTTP): whatever way a body ends,
the exit stack it owns drops the engine job, releases the encoder and frees the admission slot."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.caller import Caller
from gateway.http.protocol import SpeechRequest
from gateway.observability.request_record import close_record, open_record
from gateway.settings import Settings
from gateway.speech.service import prepare_speech
from harness import in_process, live_encoders
from ops_support import HOLD, GatedEngine, wait_until


CALLER = Caller(client="127.0.0.1", key_id=None)


def _request(text: str, **kw: object) -> SpeechRequest:
    return SpeechRequest(model="tts-1", voice="alloy", input=text, response_format="mp3", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
async def test_a_body_closed_before_its_first_read_still_ends_its_work(settings: Settings, stream_format: str) -> None:
    """A client can leave between the status line and the first body read: closing a generator
    that never started runs none of its code, so the body must still unwind its stack."""
    engine = GatedEngine(hold_after=2)
    async with in_process(settings, engine) as gw:
        services = gw.app.state.services
        _, token = open_record("/v1/audio/speech")
        try:
            prepared = await prepare_speech(services, _request(f"{HOLD}. " + "Some words to speak for a while. " * 4, stream_format=stream_format), "r-1", CALLER)
        finally:
            close_record(token)
        assert services.admission.in_flight == 1 and live_encoders()
        await prepared.body.aclose()
        assert services.admission.in_flight == 0
        assert "r-1" in engine.cancelled
        assert await asyncio.to_thread(wait_until, lambda: not live_encoders(), 5)


async def test_a_body_read_to_the_end_frees_everything(settings: Settings) -> None:
    async with in_process(settings, GatedEngine()) as gw:
        services = gw.app.state.services
        _, token = open_record("/v1/audio/speech")
        try:
            prepared = await prepare_speech(services, _request("Hello there."), "r-2", CALLER)
        finally:
            close_record(token)
        data = b"".join([chunk async for chunk in prepared.body])
        assert data and services.admission.in_flight == 0
        assert await asyncio.to_thread(wait_until, lambda: not live_encoders(), 5)


async def test_a_short_input_is_split_on_the_event_loop_a_long_one_on_a_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A thread hop costs more than splitting a short input (and under load far more: GIL
    waits), so only long inputs leave the event loop."""
    from gateway.models.families import FAMILIES
    from gateway.speech import service

    hops: list[int] = []
    real = asyncio.to_thread

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(len(args[0]))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(service.asyncio, "to_thread", counting)
    family = FAMILIES["chatterbox"]
    short = "A short sentence. And another one."
    long = "Some words to speak for a while, and then some more of them. " * 12
    assert len(short) <= service.INLINE_SPLIT_CHARS < len(long)
    assert await service.split_speech(short, family, 300) == service.speech_chunks(short, family, 300)
    assert hops == []
    assert await service.split_speech(long, family, 300) == service.speech_chunks(long, family, 300)
    assert hops == [len(long)]
