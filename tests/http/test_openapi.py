"""The committed OpenAPI document is the app's: regenerate it when the API changes with
``python -m gateway openapi --output openapi/openapi.json``."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.cli import openapi_json
from gateway.http.elevenlabs.paths import is_elevenlabs_path

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


def test_v1_routes_declare_bearer_auth_and_401_health_does_not() -> None:
    import json
    from pathlib import Path

    document = json.loads((Path(__file__).parents[2] / "openapi" / "openapi.json").read_text())
    assert document["components"]["securitySchemes"]["BearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key, when the server has keys configured; otherwise any value.",
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if is_elevenlabs_path(path):  # either header: ElevenLabs' xi-api-key or the bearer
                assert operation["security"] == [{"XiApiKey": []}, {"BearerAuth": []}], (method, path)
                assert "401" in operation["responses"], (method, path)
            elif path.startswith("/v1/"):
                assert operation["security"] == [{"BearerAuth": []}], (method, path)
                assert "401" in operation["responses"], (method, path)
            else:
                assert "security" not in operation and "401" not in operation["responses"], (method, path)
