"""Admission over real HTTP: overload is a 429 at once (before engine work), a loading or
failed engine a 503, a long queue wait a 503, and the total time limit ends a stuck request."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import msgspec
import openai
import pytest
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from ops_support import HOLD, GatedEngine, live_server, quiet_attempts, wait_until

SPEECH = {"model": "tts-1", "voice": "alloy", "response_format": "wav"}


def body(text: str, **extra: object) -> dict[str, object]:
    return {**SPEECH, "input": text, **extra}


def limited(settings: Settings, **values: object) -> Settings:
    return msgspec.structs.replace(settings, **values)


async def test_past_the_queue_is_429_at_once_and_never_reaches_the_engine(settings: Settings, api_error) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(limited(settings, max_in_flight=1, max_queued=0), engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/audio/speech", json=body(f"{HOLD} the first one.")))
            assert await asyncio.to_thread(engine.holding.wait, 10)
            for _ in quiet_attempts():  # "at once" is wall time: a stalled host measures again
                started = time.monotonic()
                second = await client.post("/v1/audio/speech", json=body("The second one."))
                elapsed = time.monotonic() - started
            assert elapsed < 1.0, elapsed
            error = api_error(second, 429, code="server_overloaded")
            assert error["type"] == "rate_limit_error"
            assert int(second.headers["retry-after"]) >= 1
            assert not first.done()  # the first is still running while the second was refused
            # the official SDK sees a RateLimitError (and would honour Retry-After)
            sdk = openai.AsyncOpenAI(api_key="k", base_url=f"{live.base_url}/v1", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await sdk.audio.speech.create(model="tts-1", voice="alloy", input="Third.")
            assert [job.chunks for job in engine.jobs] == [(f"{HOLD} the first one.",)]
            engine.gate.set()
            done = await first
            assert done.status_code == 200 and done.content[:4] == b"RIFF"
            # the slot came back: a new request is admitted
            again = await client.post("/v1/audio/speech", json=body("Now there is room."))
            assert again.status_code == 200
            assert live.services.admission.in_flight == 0


async def test_queued_request_waits_then_runs(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(limited(settings, max_in_flight=1, max_queued=1, queue_timeout_s=10), engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/audio/speech", json=body(f"{HOLD} first.")))
            assert await asyncio.to_thread(engine.holding.wait, 10)
            queued = asyncio.create_task(client.post("/v1/audio/speech", json=body("Queued second.")))
            assert await asyncio.to_thread(wait_until, lambda: live.services.admission.queued == 1)
            assert len(engine.jobs) == 1  # queued work has not reached the engine
            third = await client.post("/v1/audio/speech", json=body("Third, over the queue."))
            assert third.status_code == 429
            engine.gate.set()
            assert (await first).status_code == 200
            assert (await queued).status_code == 200


async def test_queue_wait_limit_is_503_with_retry_after(settings: Settings, api_error) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(limited(settings, max_in_flight=1, max_queued=4, queue_timeout_s=0.3), engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/audio/speech", json=body(f"{HOLD} first.")))
            assert await asyncio.to_thread(engine.holding.wait, 10)
            started = time.monotonic()
            waited = await client.post("/v1/audio/speech", json=body("Waits too long."))
            assert 0.25 < time.monotonic() - started < 15.0  # the held one never ends: the 503 is the limit's
            api_error(waited, 503, code="queue_timeout")
            assert int(waited.headers["retry-after"]) >= 1
            assert live.services.admission.queued == 0
            engine.gate.set()
            assert (await first).status_code == 200


async def test_loading_engine_is_503_with_retry_after(settings: Settings, api_error) -> None:
    engine = FakeEngine(start_delay_s=30)
    with live_server(settings, engine, wait_ready=False) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as client:
            api_error(await client.get("/ready"), 503, code="engine_unavailable")
            response = await client.post("/v1/audio/speech", json=body("Too early."))
            api_error(response, 503, code="engine_unavailable")
            assert int(response.headers["retry-after"]) >= 1
            assert engine.jobs == []


async def test_failed_engine_is_503_with_retry_after(settings: Settings, api_error) -> None:
    engine = FakeEngine(fail_start=RuntimeError("no weights here"))
    with live_server(settings, engine, wait_ready=False) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as client:
            assert await asyncio.to_thread(wait_until, lambda: live.services.engine_state == "failed")
            ready = await client.get("/ready")
            assert "no weights here" in api_error(ready, 503)["message"]
            response = await client.post("/v1/audio/speech", json=body("Broken engine."))
            api_error(response, 503, code="engine_unavailable")
            assert int(response.headers["retry-after"]) >= 1


async def test_total_time_limit_ends_a_stuck_engine_before_the_first_byte(settings: Settings, api_error) -> None:
    engine = GatedEngine(hold_after=0)
    # 2 s: the limit must fall while the engine holds, not before it has the job (a loaded
    # 2-core CI machine once took longer than 0.5 s to get there: nothing to cancel)
    with capture_logs() as logs, live_server(limited(settings, request_timeout_s=2.0), engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            started = time.monotonic()
            # pcm: no header, so nothing at all is sent before the engine's first audio
            response = await client.post(
                "/v1/audio/speech", json=body(f"{HOLD} never finishes.", response_format="pcm")
            )
            assert time.monotonic() - started < 15.0  # the engine never finishes: the 504 is the limit's
            api_error(response, 504, code="timeout")
            assert engine.holding.is_set(), "the limit fell while the engine held the job"
            # the stuck engine call was cancelled and the slot given back
            assert await asyncio.to_thread(wait_until, lambda: len(engine.cancelled) == 1)
            assert live.services.admission.in_flight == 0
            ok = await client.post("/v1/audio/speech", json=body("Still serving."))
            assert ok.status_code == 200
    lines = [e for e in logs if e["event"] == "request" and e.get("status") == 504]
    assert lines and lines[0]["outcome"] == "timeout"


async def test_total_time_limit_closes_a_stuck_stream(settings: Settings) -> None:
    engine = GatedEngine(hold_after=2)
    with capture_logs() as logs, live_server(limited(settings, request_timeout_s=1.0), engine) as live:
        text = f"{HOLD} " + "a long sentence that makes several pieces of audio " * 3
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            started = time.monotonic()
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):  # closed without the final chunk
                async with client.stream("POST", "/v1/audio/speech", json=body(text, response_format="pcm")) as r:
                    assert r.status_code == 200
                    async for data in r.aiter_raw():
                        received += data
            assert received  # audio had started flowing
            assert time.monotonic() - started < 15.0  # the stream never ends by itself
            # SSE: the same limit ends the stream with a final error event
            events = []
            async with client.stream("POST", "/v1/audio/speech", json=body(text, stream_format="sse")) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
            assert events[0]["type"] == "speech.audio.delta"
            assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "timeout"
            assert await asyncio.to_thread(wait_until, lambda: len(engine.cancelled) == 2)
            assert live.services.admission.in_flight == 0
    outcomes = [e["outcome"] for e in logs if e["event"] == "request" and e.get("path") == "/v1/audio/speech"]
    assert outcomes == ["timeout", "timeout"]
