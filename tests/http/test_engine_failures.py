"""What a client sees when the engine fails: an error response if nothing was sent yet, the
final SSE error event once the stream has started. Never a hang, never a leaked job."""

from __future__ import annotations

import json

import pytest

from gateway.engine.base import Engine
from gateway.engine.fake import FakeEngine

SPEECH = {"model": "tts-1", "input": "One sentence. Two sentences. Three sentences here.", "voice": "alloy"}


def test_fake_engine_satisfies_the_engine_protocol() -> None:
    assert isinstance(FakeEngine(), Engine)


@pytest.mark.parametrize("response_format", ["mp3", "wav", "pcm"])
async def test_failure_before_the_first_byte_is_a_500_envelope(make_gateway, api_error, response_format: str) -> None:
    engine = FakeEngine(fail_after_pieces=0)
    async with make_gateway(engine) as gw:
        response = await gw.http.post("/v1/audio/speech", json={**SPEECH, "response_format": response_format})
        error = api_error(response, 500, code="engine_error")
        assert error["type"] == "server_error"
        assert engine.failed == [response.headers["x-request-id"]]


async def test_failure_mid_sse_stream_ends_with_an_error_event(make_gateway) -> None:
    engine = FakeEngine(fail_after_pieces=2)
    async with make_gateway(engine) as gw:
        response = await gw.http.post(
            "/v1/audio/speech", json={**SPEECH, "response_format": "pcm", "stream_format": "sse", "input": "word " * 200}
        )
        assert response.status_code == 200
        events = [json.loads(block[len("data: "):]) for block in response.text.split("\n\n") if block.startswith("data: ")]
        assert events[0]["type"] == "speech.audio.delta"
        assert events[-1] == {
            "type": "error",
            "error": {
                "message": "the fake engine failed as configured",
                "type": "server_error",
                "param": None,
                "code": "engine_error",
            },
        }
        assert "speech.audio.done" not in {event["type"] for event in events}


async def test_voice_conditionals_are_computed_once_and_kept_on_disk(settings, make_gateway) -> None:
    first_engine = FakeEngine()
    async with make_gateway(first_engine) as gw:
        for voice in ("alloy", "nova", "aria"):  # three names of one built-in voice
            response = await gw.sdk.audio.speech.create(model="tts-1", input="Hi.", voice=voice, response_format="pcm")
            assert response.content
        assert first_engine.conditionals_computed == 1
    restarted = FakeEngine()
    async with make_gateway(restarted) as gw:
        await gw.sdk.audio.speech.create(model="tts-1", input="Hi.", voice="alloy", response_format="pcm")
        assert restarted.conditionals_computed == 0  # loaded from the disk cache


def test_the_fake_engines_history_is_bounded() -> None:
    from gateway.engine import fake

    items: list[int] = []
    for i in range(fake.HISTORY + 5):
        fake._append_bounded(items, i)
    assert len(items) == fake.HISTORY and items[-1] == fake.HISTORY + 4 and items[0] == 5
