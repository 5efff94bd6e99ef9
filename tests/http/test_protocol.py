from __future__ import annotations

import json

import msgspec
import pytest

from gateway.errors import InvalidRequestError
from gateway.http.protocol import (
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechUsage,
    VoiceRef,
    decode_speech_request,
)


def decode(**fields: object) -> object:
    return decode_speech_request(json.dumps(fields).encode())


def test_minimal_body_takes_openai_defaults() -> None:
    request = decode(model="tts-1", input="Hi", voice="alloy")
    assert (request.response_format, request.speed, request.stream_format) == ("mp3", 1.0, "audio")
    assert request.instructions is None
    assert (request.exaggeration, request.cfg_weight, request.seed) == (None, None, None)


def test_voice_as_object() -> None:
    request = decode(model="tts-1", input="Hi", voice={"id": "nova", "extra": 1})
    assert request.voice == VoiceRef(id="nova")
    assert request.voice_name == "nova"


def test_unknown_fields_are_ignored() -> None:
    request = decode(model="tts-1", input="Hi", voice="alloy", language="en", extra={"a": [1]})
    assert request.voice_name == "alloy"


def test_bounds_are_inclusive() -> None:
    low = decode(model="m", input="x", voice="v", speed=0.25, exaggeration=0, cfg_weight=0, min_p=0, repetition_penalty=1, seed=0)
    high = decode(model="m", input="x" * 4096, voice="v", speed=4, exaggeration=2, cfg_weight=1, temperature=5, top_p=1, min_p=1, repetition_penalty=2, seed=2**32 - 1, instructions="i" * 4096)
    assert low.speed == 0.25 and high.speed == 4.0


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{", "body", "invalid_json"),
        (b"[1, 2]", "body", "invalid_json"),
        (b'"text"', "body", "invalid_json"),
        (b'{"input": "x", "voice": "v"}', "model", "missing_required_parameter"),
        (b'{"model": "m", "voice": "v"}', "input", "missing_required_parameter"),
        (b'{"model": "m", "input": "x"}', "voice", "missing_required_parameter"),
        (b'{"model": "m", "input": "x", "voice": {}}', "voice", "invalid_value"),
        (b'{"model": "m", "input": "x", "voice": "v", "speed": 0.2}', "speed", "invalid_value"),
        (b'{"model": "m", "input": "x", "voice": "v", "seed": 4294967296}', "seed", "invalid_value"),
        (b'{"model": "m", "input": " ", "voice": "v"}', "input", "invalid_value"),
        (b'{"model": "m", "input": "x", "voice": " "}', "voice", "invalid_value"),
        (b'{"model": "m", "input": "x", "voice": {"id": " "}}', "voice", "invalid_value"),
    ],
)
def test_every_failure_is_a_400_naming_the_field(body: bytes, param: str, code: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        decode_speech_request(body)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.code == code
    assert "`$." not in caught.value.message  # the location went into param


def test_sse_events_have_the_openai_shape() -> None:
    assert json.loads(msgspec.json.encode(SpeechAudioDelta(audio="AAA="))) == {"type": "speech.audio.delta", "audio": "AAA="}
    done = SpeechAudioDone(usage=SpeechUsage(input_tokens=3, output_tokens=4, total_tokens=7))
    assert json.loads(msgspec.json.encode(done)) == {
        "type": "speech.audio.done",
        "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
    }
