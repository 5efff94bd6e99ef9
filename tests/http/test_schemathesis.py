"""Property-based fuzzing of the committed OpenAPI document against the app (fake engine):
no 5xx, every error in the OpenAI envelope, responses as documented. Bounded in examples and
time so it fits CI (well under a minute on 2 cores)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.engine.fake import FakeEngine
from gateway.http.elevenlabs.paths import is_elevenlabs_path
from gateway.settings import Settings

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
POSITIVE_EXAMPLES = 300
NEGATIVE_EXAMPLES = 300
BUDGET_S = 50.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_under_test(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        engine="fake", cache_dir=str(base / "cache"), voices_dir=str(base / "voices"), max_speech_tokens=10
    )
    app = create_app(settings, engine=FakeEngine())
    # schemathesis runs the app's lifespan itself; wait until the engine is loaded
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 20
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "app never became ready"
            time.sleep(0.05)
    return app


def _check_envelope(response, path: str) -> None:  # type: ignore[no-untyped-def]
    """Every 4xx in its face's error shape: the ElevenLabs routes answer as ElevenLabs does
    (``{"detail": {"status", "message", "param"?}}``), every other route in OpenAI's envelope."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code < 400:
        return
    body = json.loads(response.text)
    if is_elevenlabs_path(path):
        assert set(body) == {"detail"}, body
        assert {"status", "message"} <= set(body["detail"]) <= {"status", "message", "param"}, body
        assert body["detail"]["status"] and body["detail"]["message"], body
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body


@pytest.mark.parametrize(
    ("mode", "examples"), [(GenerationMode.POSITIVE, POSITIVE_EXAMPLES), (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)]
)
def test_openapi_fuzz(app_under_test, mode: GenerationMode, examples: int) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_path(SCHEMA_PATH)
    schema.app = app_under_test
    strategy = schema.as_strategy(generation_mode=mode)
    started = time.monotonic()
    seen: set[str] = set()
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]

    @hypothesis.given(case=strategy)
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:  # type: ignore[no-untyped-def]
        if time.monotonic() - started > BUDGET_S / 2:
            return  # time budget spent: the remaining examples pass without a request
        seen.add(f"{case.method} {case.path}")
        response = case.call()
        _check_envelope(response, case.formatted_path)
        case.validate_response(response, checks=checks)

    fuzz()
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    if mode == GenerationMode.POSITIVE:
        assert operations <= seen, operations - seen  # every documented operation was exercised
    else:
        # operations with a body to break were exercised with broken bodies
        assert {"POST /v1/audio/speech", "POST /v1/audio/voices"} <= seen, seen
