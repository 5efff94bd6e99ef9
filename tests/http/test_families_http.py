"""The model families through HTTP on the fake engine: /v1/models, model and language
resolution, tags, family defaults and ignored controls (fast: no weights)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import openai
import pytest
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import InProcess, in_process

ALL = ("chatterbox", "chatterbox-turbo", "chatterbox-multilingual")


@pytest.fixture
async def families(settings: Settings) -> AsyncIterator[InProcess]:
    loaded = msgspec.structs.replace(settings, models=ALL)
    async with in_process(loaded, FakeEngine()) as ctx:
        yield ctx


async def test_models_list_the_loaded_families_with_what_they_support(families: InProcess) -> None:
    body = (await families.http.get("/v1/models")).json()
    cards = {card["id"]: card for card in body["data"]}
    assert [card["id"] for card in body["data"]][:3] == list(ALL)
    assert cards["chatterbox-turbo"]["tags"][-1] == "[laugh]" and cards["chatterbox"]["tags"] == []
    assert set(cards["chatterbox-turbo"]["ignored_controls"]) == {"exaggeration", "cfg_weight", "min_p"}
    assert len(cards["chatterbox-multilingual"]["languages"]) == 23 and cards["chatterbox"]["languages"] == ["en"]
    assert (cards["tts-1"]["root"], cards["tts-1-hd"]["root"], cards["gpt-4o-mini-tts"]["root"]) == (
        "chatterbox-turbo",
        "chatterbox",
        "chatterbox-multilingual",
    )
    assert all(card["object"] == "model" for card in body["data"])
    model = await families.sdk.models.retrieve("tts-1")
    assert model.id == "tts-1" and model.root == "chatterbox-turbo"  # type: ignore[attr-defined]


async def test_a_family_that_is_not_loaded_is_404_naming_what_is(gateway: InProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.sdk.models.retrieve("chatterbox-turbo")
    assert caught.value.code == "model_not_found" and "Loaded models: chatterbox" in caught.value.message
    response = await gateway.http.post(
        "/v1/audio/speech", json={"model": "chatterbox-multilingual", "input": "Hola.", "voice": "alloy"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "chatterbox-turbo" not in [m.id for m in (await gateway.sdk.models.list()).data]


async def test_turbo_gets_tags_whole_its_defaults_and_ignores_what_it_cannot_honour(families: InProcess) -> None:
    with capture_logs() as logs:
        response = await families.sdk.audio.speech.create(
            model="tts-1",
            input="well [clear throat] hello",
            voice="alloy",
            response_format="pcm",
            extra_body={"exaggeration": 1.5, "cfg_weight": 0.1, "temperature": 0.6},
        )
    assert response.content
    job = families.engine.jobs[-1]
    assert (job.model, job.language, job.chunks) == ("chatterbox-turbo", "en", ("Well [clear throat] hello.",))
    # Turbo's upstream defaults where the request is silent; what it honours from the request
    assert (job.params.top_p, job.params.temperature, job.params.repetition_penalty) == (0.95, 0.6, 1.2)
    assert job.voice.conditionals["model"] == "chatterbox-turbo"  # conditionals of its own family
    line = next(entry for entry in logs if entry.get("event") == "request" and entry.get("path") == "/v1/audio/speech")
    assert line["family"] == "chatterbox-turbo" and line["ignored_controls"] == ["exaggeration", "cfg_weight"]


async def test_the_original_gets_the_text_without_tags(families: InProcess) -> None:
    await families.sdk.audio.speech.create(model="chatterbox", input="Hi [laugh] there.", voice="alloy", response_format="pcm")
    job = families.engine.jobs[-1]
    assert (job.model, job.chunks, job.params.exaggeration) == ("chatterbox", ("Hi there.",), 0.5)


async def test_multilingual_detects_or_takes_the_language(families: InProcess) -> None:
    await families.sdk.audio.speech.create(
        model="gpt-4o-mini-tts", input="Bonjour à tous, comment allez-vous ?", voice="alloy", response_format="pcm"
    )
    job = families.engine.jobs[-1]
    assert (job.model, job.language, job.params.repetition_penalty) == ("chatterbox-multilingual", "fr", 2.0)
    await families.sdk.audio.speech.create(
        model="chatterbox-multilingual", input="Hello", voice="alloy", response_format="pcm", extra_body={"language": "DE"}
    )
    assert families.engine.jobs[-1].language == "de"


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("chatterbox-multilingual", {"language": "klingon"}),
        ("chatterbox-multilingual", {}),  # "1234" has no language to detect
        ("chatterbox", {"language": "es"}),
        ("chatterbox-turbo", {"language": "fr"}),
        ("chatterbox", {"language": ""}),
        ("chatterbox", {"language": 5}),
    ],
)
async def test_bad_languages_are_400_naming_language(families: InProcess, model: str, extra: dict) -> None:
    response = await families.http.post(
        "/v1/audio/speech", json={"model": model, "input": "1234", "voice": "alloy", **extra}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "language"
    assert families.engine.jobs == []
