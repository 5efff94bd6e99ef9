from __future__ import annotations

import pytest

from gateway.errors import ModelNotFoundError
from gateway.http.errors import error_response
from gateway.speech.model_names import CHATTERBOX, model_ids, resolve_model


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
def test_known_names_resolve_to_chatterbox(name: str) -> None:
    assert resolve_model(name) == CHATTERBOX


@pytest.mark.parametrize(
    "name", ["", "tts-2", "tts-1-hd-2", "gpt-4o-mini-tts-2025-3-20", "gpt-4o-mini-tts-latest", "whisper-1", "chatterbox2"]
)
def test_unknown_names_are_model_not_found(name: str) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(name)
    error = caught.value
    assert error.status_code == 404
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert error_response(error).error.type == "invalid_request_error"


def test_model_ids_list_the_model_first_then_aliases_without_duplicates() -> None:
    ids = model_ids()
    assert ids[0] == CHATTERBOX
    assert len(ids) == len(set(ids))
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(ids)
    assert all(resolve_model(model_id) == CHATTERBOX for model_id in ids)
