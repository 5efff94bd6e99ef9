"""Faults mid-stream end only the stream they hit, cleanly; a dead engine makes the server
not ready. Real uvicorn server, real FFmpeg."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

import gateway.server.engine_watch
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import ffmpeg_children, live_encoders
from ops_support import HOLD, GatedEngine, live_server, wait_until

LONG = "A sentence long enough to give several pieces of audio before anything goes wrong. " * 2


def speech(text: str, **extra: object) -> dict[str, object]:
    return {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "mp3", **extra}


async def sse_events(
    client: httpx.AsyncClient, body: dict[str, object], started: asyncio.Event | None = None
) -> list[dict[str, object]]:
    events = []
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if started is not None:
                    started.set()
    return events


async def read_stream(
    client: httpx.AsyncClient, body: dict[str, object], started: asyncio.Event | None = None
) -> bytes:
    received = b""
    async with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        async for data in response.aiter_raw():
            received += data
            if data and started is not None:
                started.set()
    return received


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_ffmpeg_dying_mid_stream_ends_only_that_stream(settings: Settings, valid_audio) -> None:
    # 15 pieces (6 s of audio) before the hold: the MP3 encoder has surely sent bytes by then
    engine = GatedEngine(hold_after=15)
    # the FFmpeg-process route: its child is what this test kills
    config = msgspec.structs.replace(settings, max_speech_tokens=400, audio_encoder="ffmpeg")
    with capture_logs() as logs, live_server(config, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            for stream_format in ("audio", "sse"):
                engine.gate.clear()
                engine.holding.clear()
                before = ffmpeg_children()
                body = speech(f"{HOLD}. {LONG * 3}", stream_format=stream_format)
                started = asyncio.Event()
                reader = asyncio.create_task(
                    sse_events(client, body, started) if stream_format == "sse" else read_stream(client, body, started)
                )
                assert await asyncio.to_thread(engine.holding.wait, 10)
                await asyncio.wait_for(started.wait(), 10)  # the response is under way
                victims = ffmpeg_children() - before
                assert len(victims) == 1
                os.kill(victims.pop(), signal.SIGKILL)  # the encoder dies mid-stream
                engine.gate.set()
                if stream_format == "sse":
                    events = await reader
                    assert events[0]["type"] == "speech.audio.delta"
                    assert events[-1]["type"] == "error"
                    assert events[-1]["error"]["code"] == "encoder_error", events[-1]
                else:
                    with pytest.raises(httpx.RemoteProtocolError):  # connection closed, no final chunk
                        await reader
                # the server goes on serving
                ok = await client.post("/v1/audio/speech", json=speech("Right after the failure."))
                assert ok.status_code == 200
                valid_audio(ok.content, "mp3")
            assert await asyncio.to_thread(wait_until, lambda: not ffmpeg_children(), 5)
            assert live.services.admission.in_flight == 0
            scraped = (await client.get("/metrics")).text
            assert metric(scraped, "chatterbox_encoder_failures_total", format="mp3") == 2
    failures = [e for e in logs if e["event"] == "speech_stream_failed"]
    assert len(failures) == 2 and all("FFmpeg" in e["error"] for e in failures)
    outcomes = [e["outcome"] for e in logs if e["event"] == "request" and e.get("path") == "/v1/audio/speech"]
    assert outcomes == ["error", "ok", "error", "ok"]


async def test_engine_exception_mid_stream_ends_only_that_stream(settings: Settings, valid_audio) -> None:
    engine = GatedEngine(hold_after=10_000, fail_after=2, piece_delay_s=0.02)
    with capture_logs() as logs, live_server(settings, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            bystander = asyncio.create_task(read_stream(client, speech(LONG)))
            with pytest.raises(httpx.RemoteProtocolError):
                await read_stream(client, speech(f"{HOLD}. {LONG}", response_format="pcm"))
            events = await sse_events(client, speech(f"{HOLD}. {LONG}", stream_format="sse", response_format="pcm"))
            assert events[0]["type"] == "speech.audio.delta"
            assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "server_error"
            # the internal message is not leaked to the client
            assert "blew up" not in json.dumps(events[-1])
            valid_audio(await bystander, "mp3")
            again = await client.post("/v1/audio/speech", json=speech("And the next request works."))
            assert again.status_code == 200
            assert live.services.admission.in_flight == 0
            assert await asyncio.to_thread(wait_until, lambda: not live_encoders(), 5)
    failures = [e for e in logs if e["event"] == "speech_stream_failed"]
    assert len(failures) == 2
    assert any("blew up" in str(e.get("error")) or e.get("exc_info") for e in failures)
    # an exception nobody foresaw keeps its traceback in the log
    assert all(e.get("exc_info") for e in failures)


async def test_a_failure_the_engine_reported_itself_is_one_line_without_a_traceback(settings: Settings) -> None:
    """An engine's own EngineError (as the cluster engine raises for a replica that died) says
    what happened: each stream it cuts logs one line, not a traceback."""
    engine = FakeEngine(fail_after_pieces=2, piece_delay_s=0.01)
    with capture_logs() as logs, live_server(settings, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await read_stream(client, speech(LONG, response_format="pcm"))
            events = await sse_events(client, speech(LONG, stream_format="sse", response_format="pcm"))
            assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "engine_error"
    failures = [e for e in logs if e["event"] == "speech_stream_failed"]
    assert len(failures) == 2, failures
    for failure in failures:
        assert failure["code"] == "engine_error" and "fake engine failed" in failure["error"]
        assert not failure.get("exc_info"), failure


class DyingEngine(FakeEngine):
    """An engine whose worker can die: check_health raises from then on (as vLLM's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = False

    async def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("engine core process died")


async def test_engine_death_marks_the_server_not_ready(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, api_error
) -> None:
    monkeypatch.setattr(gateway.server.engine_watch, "HEALTH_INTERVAL_S", 0.05)
    engine = DyingEngine()
    with capture_logs() as logs, live_server(settings, engine) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            assert (await client.get("/ready")).status_code == 200
            assert (await client.post("/v1/audio/speech", json=speech("Alive."))).status_code == 200
            engine.dead = True
            assert await asyncio.to_thread(wait_until, lambda: live.services.engine_state == "failed", 5)
            ready = await client.get("/ready")
            message = api_error(ready, 503)["message"]
            assert "engine core process died" in message
            # it had loaded: /ready says it stopped working, not that it failed to load
            assert "stopped working" in message and "failed to load" not in message
            refused = await client.post("/v1/audio/speech", json=speech("Dead."))
            api_error(refused, 503, code="engine_unavailable")
            assert int(refused.headers["retry-after"]) >= 1
            assert (await client.get("/health")).status_code == 200  # the process itself is up
            assert metric((await client.get("/metrics")).text, "chatterbox_engine_ready") == 0
    assert any(e["event"] == "engine_died" for e in logs)


async def test_a_dead_vllm_engine_core_marks_the_server_not_ready(settings: Settings) -> None:
    """The vLLM engine forwards AsyncLLM.check_health (vLLM cannot run here: a stand-in for
    AsyncLLM whose engine core has died)."""
    from gateway.engine.vllm.engine import VllmEngine
    from gateway.server.engine_watch import check_engine
    from gateway.server.services import AppServices

    class DeadCore:
        async def check_health(self) -> None:
            raise RuntimeError("EngineCore encountered an issue")

    engine = VllmEngine(settings)
    services = AppServices(settings)
    services.engine, services.engine_state = engine, "ready"
    assert await check_engine(services) is True  # no AsyncLLM yet: nothing to fail
    engine.runtimes["chatterbox"].llm = DeadCore()
    assert await check_engine(services) is False
    assert services.engine_state == "failed" and "EngineCore" in (services.engine_error or "")
    engine.runtimes["chatterbox"].llm = None


async def test_an_engine_that_loads_for_several_health_intervals_is_still_watched(settings: Settings) -> None:
    from gateway.server.engine_watch import watch_engine
    from gateway.server.services import AppServices

    engine = DyingEngine()
    services = AppServices(settings)
    services.engine = engine  # state "loading"
    watcher = asyncio.create_task(watch_engine(services, interval_s=0.01))
    try:
        await asyncio.sleep(0.1)  # ten intervals of loading
        assert not watcher.done()
        services.engine_state = "ready"
        engine.dead = True
        for _ in range(500):
            if services.engine_state == "failed":
                break
            await asyncio.sleep(0.01)
        assert services.engine_state == "failed" and "died" in (services.engine_error or "")
        assert not watcher.done()  # still watching: an engine whose check passes again is ready again
    finally:
        watcher.cancel()
