"""Liveness, readiness and the 503 every engine-backed endpoint gives until the engine is ready."""

from __future__ import annotations

import asyncio
import time

import httpx
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.engine.fake import FakeEngine
from harness import serve_on_loopback

SPEECH = {"model": "tts-1", "input": "Hello.", "voice": "alloy", "response_format": "pcm"}


async def test_health_answers_while_loading_and_ready_says_503(make_gateway, api_error) -> None:
    engine = FakeEngine(start_delay_s=0.5)
    async with make_gateway(engine, ready=False) as gw:
        health = await gw.http.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}

        loading = await gw.http.get("/ready")
        error = api_error(loading, 503, code="engine_unavailable")
        assert error["type"] == "server_error"
        assert "loading" in error["message"]
        assert int(loading.headers["retry-after"]) > 0

        speech = await gw.http.post("/v1/audio/speech", json=SPEECH)
        api_error(speech, 503, code="engine_unavailable")
        assert "retry-after" in speech.headers

        for _ in range(200):
            if (await gw.http.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        ready = await gw.http.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "engine": "fake", "model": "fake-chatterbox"}
        assert (await gw.http.post("/v1/audio/speech", json=SPEECH)).status_code == 200


async def test_failed_engine_keeps_ready_503_with_the_reason(make_gateway, api_error) -> None:
    engine = FakeEngine(fail_start=RuntimeError("weights are corrupt"))
    async with make_gateway(engine, ready=False) as gw:
        for _ in range(100):
            response = await gw.http.get("/ready")
            if "failed" in response.json()["error"]["message"]:
                break
            await asyncio.sleep(0.01)
        error = api_error(response, 503, code="engine_unavailable")
        assert "weights are corrupt" in error["message"]
        assert "retry-after" in response.headers
        api_error(await gw.http.post("/v1/audio/speech", json=SPEECH), 503)
        assert (await gw.http.get("/health")).status_code == 200


async def test_bad_input_is_still_a_400_while_loading(make_gateway, api_error) -> None:
    async with make_gateway(FakeEngine(start_delay_s=5), ready=False) as gw:
        api_error(await gw.http.post("/v1/audio/speech", json={**SPEECH, "speed": 9}), 400, param="speed")
        api_error(await gw.http.post("/v1/audio/speech", json={**SPEECH, "model": "nope"}), 404, code="model_not_found")


async def test_shutdown_closes_the_engine(make_gateway) -> None:
    engine = FakeEngine()
    async with make_gateway(engine):
        assert engine.started and not engine.closed
    assert engine.closed


def test_head_health_and_ready_answer_like_get(settings) -> None:
    """On a real server (probes and load balancers send HEAD): 200 for /health at once, 503
    with Retry-After for /ready while loading, then 200; never a body."""
    app = create_app(settings, engine=FakeEngine(start_delay_s=1.0))
    with serve_on_loopback(app, ready_path="/health") as base_url:
        health = httpx.head(f"{base_url}/health")
        assert health.status_code == 200 and health.content == b""
        loading = httpx.head(f"{base_url}/ready")
        assert loading.status_code == 503 and loading.content == b""
        assert int(loading.headers["retry-after"]) > 0
        for _ in range(300):
            if (ready := httpx.head(f"{base_url}/ready")).status_code == 200:
                break
            time.sleep(0.01)
        assert ready.status_code == 200 and ready.content == b""


async def test_a_ready_poll_while_loading_writes_one_debug_line(make_gateway) -> None:
    """A probe polling /ready while the engine loads gets the 503 it expects: one debug line
    each (a warning per poll would fill the start-up log); a 503 on the API is a warning."""
    async with make_gateway(FakeEngine(start_delay_s=5), ready=False) as gw:
        with capture_logs() as logs:
            assert (await gw.http.get("/ready")).status_code == 503
            assert (await gw.http.head("/ready")).status_code == 503
            assert (await gw.http.post("/v1/audio/speech", json=SPEECH)).status_code == 503
    assert [(e["event"], e["method"], e["log_level"]) for e in logs] == [
        ("request", "GET", "debug"), ("request", "HEAD", "debug"), ("request", "POST", "warning")
    ]
    assert logs[0]["status"] == 503 and "loading" in logs[0]["error"]
