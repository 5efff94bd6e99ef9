"""The committed OpenAPI document is the app's: regenerate it when the API changes with
``python -m gateway openapi --output openapi/openapi.json``."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.cli import openapi_json

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_app() -> None:
    assert COMMITTED.is_file(), "openapi/openapi.json is missing"
    assert COMMITTED.read_text(encoding="utf-8") == openapi_json(), (
        "openapi/openapi.json is stale: run `python -m gateway openapi --output openapi/openapi.json`"
    )


def test_document_describes_the_speech_contract() -> None:
    document = json.loads(openapi_json())
    speech = document["paths"]["/v1/audio/speech"]["post"]
    body = speech["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["model", "input", "voice"]
    for control in ("exaggeration", "cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty", "seed"):
        assert control in body["properties"]
    assert body["properties"]["speed"]["anyOf"][0]["minimum"] == 0.25
    assert set(speech["responses"]["200"]["content"]) == {
        "audio/mpeg", "audio/ogg", "audio/aac", "audio/flac", "audio/wav", "audio/pcm", "text/event-stream"
    }
    assert {"400", "404", "413", "503"} <= set(speech["responses"])
    assert "422" not in json.dumps(document["paths"])
    assert {"/v1/models", "/v1/audio/voices", "/health", "/ready"} <= set(document["paths"])
