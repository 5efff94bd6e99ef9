"""The official OpenAI SDK (and plain HTTP) against a real uvicorn server on loopback."""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest
from harness import live_encoders

from gateway.audio.encoder import CONTENT_TYPES

FORMATS = tuple(CONTENT_TYPES)
LONG_TEXT = " ".join(f"This is sentence number {i}, spoken by the gateway." for i in range(40))


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("response_format", FORMATS)
def test_every_format_through_the_sdk(live_server, response_format: str, valid_audio) -> None:
    response = live_server.sdk().audio.speech.create(
        model="tts-1", input="Hello from a real server.", voice="alloy", response_format=response_format
    )
    valid_audio(response.content, response_format)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "wav"])
def test_first_bytes_leave_before_synthesis_finishes(live_server, response_format: str, valid_audio) -> None:
    request_id = f"stream-{response_format}"
    with live_server.sdk().audio.speech.with_streaming_response.create(
        model="tts-1",
        input=LONG_TEXT,
        voice="alloy",
        response_format=response_format,
        extra_headers={"x-request-id": request_id},
    ) as response:
        assert response.headers["content-type"] == CONTENT_TYPES[response_format]
        assert response.headers["x-request-id"] == request_id
        pieces = response.iter_bytes()
        first = next(pieces)
        assert first
        assert request_id not in live_server.engine.completed  # the engine is still working
        data = first + b"".join(pieces)
    assert request_id in live_server.engine.completed
    valid_audio(data, response_format)


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_client_disconnect_cancels_the_engine_job(live_server, stream_format: str) -> None:
    request_id = f"hangup-{stream_format}"
    body = {"model": "tts-1", "input": LONG_TEXT, "voice": "alloy", "response_format": "mp3", "stream_format": stream_format}
    with httpx.Client(base_url=live_server.base_url) as client:
        with client.stream("POST", "/v1/audio/speech", json=body, headers={"x-request-id": request_id}) as response:
            assert response.status_code == 200
            next(response.iter_raw())
        # leaving the block closes the connection mid-body
    assert wait_for(lambda: request_id in live_server.engine.cancelled), live_server.engine.cancelled
    assert request_id not in live_server.engine.completed
    assert wait_for(lambda: not live_encoders()), "the encoder outlived the request"


def test_sse_events_stream_and_decode(live_server, valid_audio) -> None:
    body = {"model": "tts-1", "input": "Streaming events.", "voice": "echo", "response_format": "aac", "stream_format": "sse"}
    events = []
    with httpx.Client(base_url=live_server.base_url) as client:
        with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
    assert [event["type"] for event in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    valid_audio(b"".join(base64.b64decode(event["audio"]) for event in events[:-1]), "aac")


def test_extra_body_controls_over_http(live_server) -> None:
    live_server.sdk().audio.speech.create(
        model="tts-1-hd", input="Hi.", voice="onyx", response_format="pcm", extra_body={"exaggeration": 0.9, "seed": 5}
    )
    params = live_server.engine.jobs[-1].params
    assert (params.exaggeration, params.seed) == (0.9, 5)


def test_error_classes_over_http(live_server, api_error) -> None:
    sdk = live_server.sdk()
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.audio.speech.create(model="nope", input="Hi.", voice="alloy")
    assert (not_found.value.code, not_found.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as bad_voice:
        sdk.audio.speech.create(model="tts-1", input="Hi.", voice="nobody")
    assert bad_voice.value.param == "voice"
    with pytest.raises(openai.BadRequestError) as bad_speed:
        sdk.audio.speech.create(model="tts-1", input="Hi.", voice="alloy", speed=10)
    assert bad_speed.value.param == "speed"

    url = f"{live_server.base_url}/v1/audio/speech"
    json_type = {"content-type": "application/json"}
    api_error(httpx.post(url, content=b'{"model": ', headers=json_type), 400, param="body")
    api_error(httpx.post(url, content=b"[]", headers=json_type), 400, param="body")
    api_error(httpx.post(url, content=b"model=tts-1", headers={"content-type": "application/x-www-form-urlencoded"}), 400)
    api_error(httpx.get(url), 405)
    api_error(httpx.get(f"{live_server.base_url}/v2/nothing"), 404)
    api_error(httpx.post(url, content=b"{" + b" " * (70 * 1024) + b"}", headers=json_type), 413)


def test_openapi_document_is_served(live_server) -> None:
    response = httpx.get(f"{live_server.base_url}/schema/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert "/v1/audio/speech" in document["paths"]
