"""GET /v1/models and GET /v1/audio/voices, in OpenAI's list shape."""

from __future__ import annotations

import openai
import pytest

from gateway.speech.model_names import ModelNames

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar")


async def test_models_list_through_the_sdk(gateway) -> None:
    page = await gateway.sdk.models.list()
    assert [model.id for model in page.data] == ModelNames(("chatterbox",)).ids()
    assert all(model.object == "model" and model.owned_by and model.created > 0 for model in page.data)


async def test_model_retrieve(gateway) -> None:
    model = await gateway.sdk.models.retrieve("tts-1-hd")
    assert model.id == "tts-1-hd"
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.sdk.models.retrieve("dall-e-3")
    assert caught.value.code == "model_not_found"


async def test_voices_list_every_voice_and_alias(gateway) -> None:
    response = await gateway.http.get("/v1/audio/voices")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["data"]
    for voice in body["data"]:
        assert set(voice) == {"id", "name", "aliases", "source", "object"}
        assert voice["object"] == "voice"
        assert voice["source"] in {"checkpoint", "builtin", "user"}
    names = {voice["id"] for voice in body["data"]} | {alias for voice in body["data"] for alias in voice["aliases"]}
    assert set(OPENAI_VOICES) <= names


@pytest.mark.parametrize("voice", OPENAI_VOICES)
async def test_every_openai_voice_speaks(gateway, voice: str) -> None:
    response = await gateway.sdk.audio.speech.create(model="tts-1", input="Hi.", voice=voice, response_format="pcm")
    assert len(response.content) > 0
