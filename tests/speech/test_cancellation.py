"""A client that hangs up mid-stream stops all work for it (real uvicorn server on loopback):
the engine sees the cancel, the encoder is released (in-process worker thread joined, or an
FFmpeg process killed and reaped), the admission slot comes back, and other streams running
at the same time finish normally."""

from __future__ import annotations

import asyncio
import threading

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.settings import Settings
from harness import live_encoders
from ops_support import HOLD, GatedEngine, live_server, wait_until

NORMAL_TEXT = "Other people are still listening to this sentence while someone else hangs up on theirs."

IMPATIENT = httpx.Timeout(10.0, read=0.5)
"""A client that gives up 0.5 s into waiting for its answer (connecting on a busy machine may
take longer; that is not the impatience these tests are about)."""


def speech(text: str, **extra: object) -> dict[str, object]:
    return {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "mp3", **extra}


async def _read_all(client: httpx.AsyncClient, body: dict[str, object]) -> bytes:
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        return await response.aread()


async def _hang_up_after_first_bytes(
    client: httpx.AsyncClient, body: dict[str, object], *, once: threading.Event | None = None
) -> str:
    """Read the first bytes, then (after ``once`` is set, if given) close the connection."""
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        async for data in response.aiter_raw():
            if data:
                # (still inside the loop: leaving it closes the response)
                if once is not None:
                    assert await asyncio.to_thread(once.wait, 10)
                break
        return response.headers["x-request-id"]
    # leaving the block unread closes the connection: the server sees the disconnect


async def test_disconnect_mid_stream_cancels_engine_and_releases_the_encoder(settings: Settings, valid_audio) -> None:
    engine = GatedEngine(hold_after=2, piece_delay_s=0.03)
    config = msgspec.structs.replace(settings, max_speech_tokens=200)
    assert live_encoders() == set()
    with capture_logs() as logs, live_server(config, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            others = [asyncio.create_task(_read_all(client, speech(NORMAL_TEXT))) for _ in range(2)]
            hold = speech(f"{HOLD}. " + "A long text that will never be heard to the end. " * 4)
            # hang up only once the engine is held: the first bytes can come before that
            holding = asyncio.create_task(_hang_up_after_first_bytes(client, hold, once=engine.holding))
            assert await asyncio.to_thread(engine.holding.wait, 10)
            # while held, its encoder is alive (so the check below is meaningful)
            assert live_encoders()
            request_id = await holding

            assert await asyncio.to_thread(wait_until, lambda: request_id in engine.cancelled, 5)
            outputs = await asyncio.gather(*others)
            assert await asyncio.to_thread(wait_until, lambda: not live_encoders(), 5), live_encoders()
            assert live.services.admission.in_flight == 0
            for data in outputs:
                valid_audio(data, "mp3")
            assert len(engine.completed) == 2 and engine.cancelled == [request_id]
    lines = {e["request_id"]: e for e in logs if e["event"] == "request" and e.get("path") == "/v1/audio/speech"}
    assert lines[request_id]["outcome"] == "cancelled"
    assert sorted(e["outcome"] for e in lines.values()) == ["cancelled", "ok", "ok"]


async def test_disconnect_mid_sse_stream_cancels_too(settings: Settings) -> None:
    engine = GatedEngine(hold_after=2)
    with live_server(settings, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            hold = speech(f"{HOLD}. " + "Streamed as events, abandoned half way. " * 3, stream_format="sse")
            request_id = await _hang_up_after_first_bytes(client, hold)
            assert await asyncio.to_thread(wait_until, lambda: request_id in engine.cancelled, 5)
            assert await asyncio.to_thread(wait_until, lambda: not live_encoders(), 5)
            assert live.services.admission.in_flight == 0
            # the server is unaffected
            after = await client.post("/v1/audio/speech", json=speech("Still here."))
            assert after.status_code == 200


async def test_many_disconnects_leave_nothing_behind(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    with live_server(settings, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            texts = [f"{HOLD} number {i}. " + "Some words to make audio. " * 3 for i in range(8)]
            formats = ["mp3", "opus", "aac", "flac", "wav", "pcm", "mp3", "opus"]
            ids = await asyncio.gather(
                *(_hang_up_after_first_bytes(client, speech(t, response_format=f)) for t, f in zip(texts, formats))
            )
            assert await asyncio.to_thread(wait_until, lambda: set(ids) <= set(engine.cancelled), 10)
            assert await asyncio.to_thread(wait_until, lambda: not live_encoders(), 5), live_encoders()
            assert live.services.admission.in_flight == 0


async def test_disconnect_while_queued_frees_the_place_and_never_reaches_the_engine(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    config = msgspec.structs.replace(settings, max_in_flight=1, max_queued=2, queue_timeout_s=60)
    with capture_logs() as logs, live_server(config, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/audio/speech", json=speech(f"{HOLD} first.")))
            assert await asyncio.to_thread(engine.holding.wait, 10)
            # this client gives up after 0.5 s while its request waits in the queue
            async with httpx.AsyncClient(base_url=live.base_url, timeout=IMPATIENT) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post("/v1/audio/speech", json=speech("Gave up waiting."))
            # its queue place is freed at once, long before the 60 s queue limit
            assert await asyncio.to_thread(wait_until, lambda: live.services.admission.queued == 0, 3)
            engine.gate.set()
            assert (await first).status_code == 200
            assert [job.chunks for job in engine.jobs] == [(f"{HOLD} first.",)]
            assert live.services.admission.in_flight == 0
    outcomes = [e["outcome"] for e in logs if e["event"] == "request" and e.get("path") == "/v1/audio/speech"]
    assert sorted(outcomes) == ["cancelled", "ok"]


async def test_disconnect_before_the_first_audio_stops_the_engine_job(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(settings, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=IMPATIENT) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/v1/audio/speech", json=speech(f"{HOLD} never heard."))
        assert await asyncio.to_thread(wait_until, lambda: len(engine.cancelled) == 1, 3)
        assert live.services.admission.in_flight == 0
