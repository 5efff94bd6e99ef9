from __future__ import annotations

import pytest

from gateway.errors import ModelNotFoundError
from gateway.http.errors import error_response
from gateway.models.families import MULTILINGUAL, ORIGINAL, TURBO
from gateway.speech.model_names import ModelNames

ALL = (ORIGINAL, TURBO, MULTILINGUAL)


@pytest.mark.parametrize(
    "name",
    [
        "chatterbox",
        "tts-1",
        "tts-1-hd",
        "tts-1-1106",
        "tts-1-hd-1106",
        "gpt-4o-mini-tts",
        "gpt-4o-mini-tts-2025-03-20",
        "gpt-4o-mini-tts-2025-12-15",
        "gpt-4o-mini-tts-2031-01-09",
        "TTS-1",
        " chatterbox ",
    ],
)
def test_with_only_the_original_loaded_every_name_means_it(name: str) -> None:
    assert ModelNames((ORIGINAL,)).resolve(name).id == ORIGINAL


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tts-1", TURBO),
        ("tts-1-1106", TURBO),
        ("tts-1-hd", ORIGINAL),
        ("gpt-4o-mini-tts", MULTILINGUAL),
        ("gpt-4o-mini-tts-2031-01-09", MULTILINGUAL),
        ("chatterbox-turbo", TURBO),
        ("Chatterbox-Multilingual", MULTILINGUAL),
    ],
)
def test_default_aliases_follow_openais_meaning_when_the_target_is_loaded(name: str, expected: str) -> None:
    assert ModelNames(ALL).resolve(name).id == expected


def test_aliases_fall_back_to_the_original_then_the_first_loaded() -> None:
    names = ModelNames((MULTILINGUAL, ORIGINAL))
    assert names.resolve("tts-1").id == ORIGINAL
    only_turbo = ModelNames((TURBO,))
    assert {only_turbo.resolve(alias).id for alias in ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")} == {TURBO}


def test_configured_aliases_override_and_add_names() -> None:
    names = ModelNames(ALL, ["tts-1=chatterbox", "house-voice=chatterbox-multilingual"])
    assert names.resolve("tts-1").id == ORIGINAL
    assert names.resolve("house-voice").id == MULTILINGUAL
    assert "house-voice" in names.ids()


@pytest.mark.parametrize(
    "entry", ["tts-1", "tts-1=chatterbox-turbo", "chatterbox=chatterbox", "=chatterbox", "a b=chatterbox", "x=nope"]
)
def test_bad_alias_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="model alias"):
        ModelNames((ORIGINAL,), [entry])


@pytest.mark.parametrize(
    "name", ["", "tts-2", "tts-1-hd-2", "gpt-4o-mini-tts-2025-3-20", "gpt-4o-mini-tts-latest", "whisper-1", "chatterbox2"]
)
def test_unknown_names_are_model_not_found_naming_what_is_loaded(name: str) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        ModelNames((ORIGINAL, TURBO)).resolve(name)
    error = caught.value
    assert error.status_code == 404
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert "Loaded models: chatterbox, chatterbox-turbo" in error.message
    assert error_response(error).error.type == "invalid_request_error"


def test_a_known_family_that_is_not_loaded_is_model_not_found() -> None:
    with pytest.raises(ModelNotFoundError, match="'chatterbox-turbo' is not loaded on this server. Loaded models: chatterbox"):
        ModelNames((ORIGINAL,)).resolve("chatterbox-turbo")


def test_ids_list_the_loaded_families_first_then_aliases_without_duplicates() -> None:
    names = ModelNames((TURBO, ORIGINAL))
    ids = names.ids()
    assert ids[:2] == [TURBO, ORIGINAL]
    assert MULTILINGUAL not in ids
    assert len(ids) == len(set(ids))
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(ids)
    assert all(names.resolve(model_id).id in (TURBO, ORIGINAL) for model_id in ids)
