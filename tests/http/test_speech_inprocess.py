"""The official OpenAI SDK against the app in-process (ASGI transport), on the fake engine."""

from __future__ import annotations

import base64
import json

import pytest

from gateway.engine.base import GenerationParams
from gateway.audio.encoder import CONTENT_TYPES

FORMATS = tuple(CONTENT_TYPES)

TEXT = "Hello there. This is the gateway speaking."


@pytest.mark.parametrize("response_format", FORMATS)
async def test_every_format_decodes(gateway, response_format: str, valid_audio) -> None:
    response = await gateway.sdk.audio.speech.create(
        model="tts-1", input=TEXT, voice="alloy", response_format=response_format
    )
    valid_audio(response.content, response_format)


async def test_default_format_is_mp3_with_content_type(gateway, valid_audio) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech", json={"model": "chatterbox", "input": TEXT, "voice": "alloy"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    valid_audio(response.content, "mp3")


@pytest.mark.parametrize(
    ("response_format", "content_type"),
    [("mp3", "audio/mpeg"), ("opus", "audio/ogg"), ("aac", "audio/aac"), ("flac", "audio/flac"), ("wav", "audio/wav"), ("pcm", "audio/pcm")],
)
async def test_content_type_per_format(gateway, response_format: str, content_type: str) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": response_format},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type


async def test_with_streaming_response(gateway, valid_audio) -> None:
    async with gateway.sdk.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", input=TEXT, voice="nova", response_format="opus"
    ) as response:
        assert response.headers["content-type"] == "audio/ogg"
        data = b"".join([chunk async for chunk in response.iter_bytes()])
    valid_audio(data, "opus")


@pytest.mark.parametrize("response_format", ["mp3", "wav", "opus"])
async def test_sse_events_concatenate_to_one_file(gateway, response_format: str, valid_audio) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": response_format, "stream_format": "sse"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert len(events) >= 2
    *deltas, done = events
    assert all(event["type"] == "speech.audio.delta" for event in deltas)
    assert done["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
    valid_audio(audio, response_format)

    usage = done["usage"]
    job = gateway.engine.jobs[-1]
    assert usage["input_tokens"] == sum(gateway.engine.count_text_tokens(chunk) for chunk in job.chunks) > 0
    assert usage["output_tokens"] == sum(
        gateway.engine.speech_tokens_for(chunk, job.params.max_speech_tokens) for chunk in job.chunks
    )
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_sse_through_the_sdk(gateway) -> None:
    response = await gateway.sdk.audio.speech.create(
        model="tts-1", input="Short.", voice="alloy", response_format="pcm", stream_format="sse"
    )
    assert b"speech.audio.done" in response.content


async def test_extra_body_controls_reach_the_engine(gateway) -> None:
    controls = {
        "exaggeration": 1.25,
        "cfg_weight": 0.3,
        "temperature": 0.6,
        "top_p": 0.9,
        "min_p": 0.1,
        "repetition_penalty": 1.5,
        "seed": 1234,
    }
    await gateway.sdk.audio.speech.create(
        model="tts-1", input=TEXT, voice="alloy", response_format="pcm", extra_body={**controls, "unknown_extra": [1]}
    )
    params = gateway.engine.jobs[-1].params
    assert {name: getattr(params, name) for name in controls} == controls
    assert params.max_speech_tokens == 50  # from the settings, not the client


async def test_defaults_when_no_controls(gateway) -> None:
    await gateway.sdk.audio.speech.create(model="tts-1", input=TEXT, voice="alloy", response_format="pcm")
    assert gateway.engine.jobs[-1].params == GenerationParams(max_speech_tokens=50)


async def test_seed_makes_audio_repeatable(gateway) -> None:
    async def speak(seed: int) -> bytes:
        response = await gateway.sdk.audio.speech.create(
            model="tts-1", input=TEXT, voice="alloy", response_format="pcm", extra_body={"seed": seed}
        )
        return response.content

    first, again, other = await speak(7), await speak(7), await speak(8)
    assert first == again
    assert first != other


async def test_voice_as_object_and_voice_changes_audio(gateway) -> None:
    by_name = await gateway.http.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm"}
    )
    by_object = await gateway.http.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": {"id": "alloy"}, "response_format": "pcm"}
    )
    assert by_name.status_code == by_object.status_code == 200
    assert by_name.content == by_object.content
    assert gateway.engine.jobs[-1].voice.key == gateway.engine.jobs[-2].voice.key


async def test_speed_changes_duration(gateway, valid_audio) -> None:
    async def duration(speed: float) -> float:
        response = await gateway.sdk.audio.speech.create(
            model="tts-1", input=TEXT, voice="alloy", response_format="wav", speed=speed
        )
        return valid_audio(response.content, "wav").duration_s

    normal, fast = await duration(1.0), await duration(2.0)
    assert fast == pytest.approx(normal / 2, rel=0.1)


async def test_instructions_are_accepted(gateway) -> None:
    response = await gateway.sdk.audio.speech.create(
        model="gpt-4o-mini-tts", input="Hi.", voice="coral", instructions="Speak cheerfully.", response_format="pcm"
    )
    assert len(response.content) > 0


async def test_long_input_is_split_into_chunks(gateway, valid_audio) -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    assert len(text) > 1000
    response = await gateway.sdk.audio.speech.create(model="tts-1", input=text, voice="alloy", response_format="flac")
    valid_audio(response.content, "flac")
    chunks = gateway.engine.jobs[-1].chunks
    assert len(chunks) > 1
    assert all(len(chunk) <= 300 for chunk in chunks)


async def test_request_id_is_echoed_and_reaches_the_engine(gateway) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "pcm"},
        headers={"x-request-id": "client-id-42"},
    )
    assert response.headers["x-request-id"] == "client-id-42"
    assert gateway.engine.jobs[-1].request_id == "client-id-42"

    generated = await gateway.http.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "pcm"}
    )
    assert generated.headers["x-request-id"] == gateway.engine.jobs[-1].request_id != "client-id-42"
