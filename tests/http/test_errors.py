"""Every way a request can be wrong gives the OpenAI error envelope with the right status:
never 422, never a 5xx for bad input (the SDK would retry a 5xx)."""

from __future__ import annotations

import openai
import pytest


GOOD = {"model": "tts-1", "input": "Hello.", "voice": "alloy"}


async def test_unknown_model_is_404_model_not_found(gateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.sdk.audio.speech.create(model="tts-9", input="Hi.", voice="alloy")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert caught.value.type == "invalid_request_error"


async def test_unknown_voice_is_400_naming_voice(gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.sdk.audio.speech.create(model="tts-1", input="Hi.", voice="no-such-voice")
    assert caught.value.param == "voice"
    assert "no-such-voice" in caught.value.message
    assert gateway.engine.jobs == []


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": "   \n\t"}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"input": 12}, "input"),
        ({"voice": ""}, "voice"),
        ({"voice": 3}, "voice"),
        ({"voice": {"name": "alloy"}}, "voice"),
        ({"model": ""}, "model"),
        ({"speed": 0.1}, "speed"),
        ({"speed": 4.5}, "speed"),
        ({"speed": "fast"}, "speed"),
        ({"response_format": "ogg"}, "response_format"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"instructions": "x" * 4097}, "instructions"),
        ({"exaggeration": 2.5}, "exaggeration"),
        ({"cfg_weight": -0.1}, "cfg_weight"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0.5}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
async def test_bad_values_are_400_with_param(gateway, change: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.sdk.audio.speech.create(**GOOD, extra_body=change)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert gateway.engine.jobs == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": ""}, "'input' must not be empty."),
        ({"input": " "}, "'input' must not be blank."),
        ({"input": "x" * 4097}, "'input' must be at most 4096 characters long."),
        ({"model": ""}, "'model' must not be empty."),
        ({"instructions": "x" * 4097}, "'instructions' must be at most 4096 characters long."),
    ],
)
async def test_text_lengths_are_said_in_words(gateway, change: dict[str, object], message: str, api_error) -> None:
    error = api_error(await gateway.http.post("/v1/audio/speech", json={**GOOD, **change}), 400, param=next(iter(change)))
    assert error["message"] == message


@pytest.mark.parametrize("missing", ["model", "input", "voice"])
async def test_missing_field_is_400_with_param(gateway, missing: str, api_error) -> None:
    body = {k: v for k, v in GOOD.items() if k != missing}
    api_error(await gateway.http.post("/v1/audio/speech", json=body), 400, param=missing)


@pytest.mark.parametrize("body", [b"{", b"{'model': 'tts-1'}", b"", b"null"])
async def test_malformed_json_is_400(gateway, body: bytes, api_error) -> None:
    response = await gateway.http.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    api_error(response, 400, param="body")


async def test_json_array_is_400(gateway, api_error) -> None:
    response = await gateway.http.post("/v1/audio/speech", json=[GOOD])
    api_error(response, 400, param="body")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
async def test_wrong_content_type_is_400(gateway, content_type: str, api_error) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech", content=b'{"model":"tts-1","input":"Hi","voice":"alloy"}', headers={"content-type": content_type}
    )
    api_error(response, 400, param="Content-Type", code="unsupported_media_type")


async def test_json_content_type_with_charset_is_accepted(gateway) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech",
        content=b'{"model":"tts-1","input":"Hi","voice":"alloy","response_format":"pcm"}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


async def test_body_too_large_is_413(gateway, api_error) -> None:
    body = {**GOOD, "padding": "x" * (65 * 1024)}
    api_error(await gateway.http.post("/v1/audio/speech", json=body), 413, code="payload_too_large")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_is_405(gateway, method: str, api_error) -> None:
    response = await gateway.http.request(method, "/v1/audio/speech")
    api_error(response, 405, code="method_not_allowed")


async def test_unknown_route_is_404(gateway, api_error) -> None:
    api_error(await gateway.http.get("/v1/audio/nothing-here"), 404, code="not_found")
    api_error(await gateway.http.post("/v1/chat/completions", json={}), 404, code="not_found")


async def test_errors_carry_the_request_id(gateway) -> None:
    response = await gateway.http.get("/nope", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    response = await gateway.http.get("/nope", headers={"x-request-id": "bad id with spaces"})
    assert response.headers["x-request-id"] != "bad id with spaces"
    assert len(response.headers["x-request-id"]) == 32


async def test_unknown_fields_are_ignored(gateway) -> None:
    response = await gateway.http.post(
        "/v1/audio/speech", json={**GOOD, "response_format": "pcm", "language": "en", "sample_rate": 16000, "x": {"y": 1}}
    )
    assert response.status_code == 200
