"""API keys: every /v1 route refuses a missing or wrong key with the 401 envelope; health and
ready stay open; /metrics is protected only when configured; no keys = any bearer."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

import msgspec
import openai
import pytest
from structlog.testing import capture_logs

from gateway.http.auth import KeyChecker, bearer_token
from gateway.http.elevenlabs.paths import is_elevenlabs_path
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import in_process


KEYS = ("sk-first-key-0123456789", "sk-second-key-abcdef")
SPEECH = {"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "wav"}


def with_keys(settings: Settings, **extra: object) -> Settings:
    return msgspec.structs.replace(settings, api_keys=KEYS, **extra)


def v1_routes(app: object) -> list[tuple[str, str]]:
    """(method, concrete path) for every /v1 HTTP route the app has, path parameters filled in
    (WebSockets: tests/http/elevenlabs/test_elevenlabs_ws_bounds.py)."""
    found = []
    for route in app.routes:  # type: ignore[attr-defined]
        if not route.path.startswith("/v1") or not hasattr(route, "methods"):
            continue
        path = re.sub(r"\{[^}]+\}", "anything", route.path)
        for method in sorted(route.methods - {"OPTIONS", "HEAD"}):
            found.append((method, path))
    return found


async def test_every_v1_route_needs_a_valid_key(settings: Settings, api_error) -> None:
    async with in_process(with_keys(settings), FakeEngine()) as gw:
        routes = v1_routes(gw.app)
        # the speech, models and voices routes at least; new routes are covered automatically
        assert {("POST", "/v1/audio/speech"), ("GET", "/v1/models"), ("GET", "/v1/audio/voices")} <= set(routes)
        for method, path in routes:
            for headers in (
                {},
                {"Authorization": "Bearer sk-wrong"},
                {"Authorization": f"Basic {KEYS[0]}"},
                {"xi-api-key": "sk-wrong"},
            ):
                response = await gw.http.request(method, path, headers=headers, json=SPEECH)
                if is_elevenlabs_path(path):  # that face's own error shape
                    assert response.status_code == 401, (method, path, response.text)
                    assert response.json()["detail"]["status"] == "invalid_api_key"
                else:
                    error = api_error(response, 401, code="invalid_api_key")
                    assert error["type"] == "invalid_request_error"
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.headers["x-request-id"]
            for good in ({"Authorization": f"Bearer {KEYS[1]}"}, {"xi-api-key": KEYS[0]}):
                ok = await gw.http.request(method, path, headers=good, json=SPEECH)
                assert ok.status_code != 401, (method, path, ok.text)


async def test_right_key_works_with_the_openai_sdk(settings: Settings) -> None:
    async with in_process(with_keys(settings), FakeEngine()) as gw:
        good = openai.AsyncOpenAI(api_key=KEYS[0], base_url="http://gateway.test/v1", http_client=gw.http, max_retries=0)
        audio = await good.audio.speech.create(model="tts-1", voice="alloy", input="Hi there.", response_format="wav")
        assert audio.content[:4] == b"RIFF"
        models = await good.models.list()
        assert models.data
        bad = openai.AsyncOpenAI(api_key="sk-nope", base_url="http://gateway.test/v1", http_client=gw.http, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.audio.speech.create(model="tts-1", voice="alloy", input="Hi there.")
        assert info.value.code == "invalid_api_key"
        # the refused request never reached the engine
        assert len(gw.engine.jobs) == 1


async def test_health_and_ready_stay_open(settings: Settings) -> None:
    async with in_process(with_keys(settings), FakeEngine()) as gw:
        assert (await gw.http.get("/health")).status_code == 200
        assert (await gw.http.get("/ready")).status_code == 200
        assert (await gw.http.get("/metrics")).status_code == 200  # open unless configured


async def test_metrics_behind_auth_when_configured(settings: Settings, api_error) -> None:
    async with in_process(with_keys(settings, metrics_require_auth=True), FakeEngine()) as gw:
        api_error(await gw.http.get("/metrics"), 401, code="invalid_api_key")
        ok = await gw.http.get("/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert ok.status_code == 200 and "chatterbox_requests_total" in ok.text
        assert (await gw.http.get("/ready")).status_code == 200


async def test_keys_file_is_read(settings: Settings, tmp_path: Path, api_error) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# comment\n\nsk-from-file\n", encoding="utf-8")
    configured = msgspec.structs.replace(settings, api_keys_file=str(keys_file))
    async with in_process(configured, FakeEngine()) as gw:
        api_error(await gw.http.get("/v1/models", headers={"Authorization": "Bearer sk-other"}), 401)
        assert (await gw.http.get("/v1/models", headers={"Authorization": "Bearer sk-from-file"})).status_code == 200


async def test_no_keys_accepts_any_bearer_and_warns(settings: Settings) -> None:
    with capture_logs() as logs:
        async with in_process(settings, FakeEngine()) as gw:
            for headers in ({"Authorization": "Bearer whatever"}, {"Authorization": "Bearer "}, {}):
                response = await gw.http.post("/v1/audio/speech", json=SPEECH, headers=headers)
                assert response.status_code == 200, response.text
    warnings = [e for e in logs if e["event"] == "api_keys_disabled"]
    assert warnings and warnings[0]["log_level"] == "warning"


async def test_keys_are_never_logged(settings: Settings) -> None:
    with capture_logs() as logs:
        async with in_process(with_keys(settings), FakeEngine()) as gw:
            await gw.http.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"})
            await gw.http.get("/v1/models", headers={"Authorization": "Bearer sk-guess-123"})
    text = repr(logs)
    assert logs  # the requests were logged...
    for secret in (*KEYS, "sk-guess-123"):
        assert secret not in text  # ...but no key, right or wrong


def test_key_comparison_checks_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken must not reveal whether or which key matched."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    checker = KeyChecker(["k-one", "k-two", "k-three"])
    for presented in (b"k-one", b"k-three", b"nope"):
        calls.clear()
        checker.accepts(presented)
        assert len(calls) == 3


def test_bearer_parsing() -> None:
    assert bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"x-other", b"Bearer abc")]) is None
    # a non-ASCII key is compared as bytes, never crashes the comparison
    assert KeyChecker(["clé"]).accepts("clé".encode()) and not KeyChecker(["k"]).accepts("é".encode())


async def test_cors_preflight_and_headers_when_configured(settings: Settings) -> None:
    configured = with_keys(settings, cors_origins=("https://app.example",))
    async with in_process(configured, FakeEngine()) as gw:
        preflight = await gw.http.options(
            "/v1/audio/speech",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert preflight.status_code in (200, 204), preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = await gw.http.post(
            "/v1/audio/speech",
            json=SPEECH,
            headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEYS[0]}"},
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        other = await gw.http.options(
            "/v1/audio/speech",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_cors_off_by_default(settings: Settings) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        response = await gw.http.post("/v1/audio/speech", json=SPEECH, headers={"Origin": "https://app.example"})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


async def test_odd_spellings_of_v1_paths_are_still_protected(settings: Settings) -> None:
    async with in_process(with_keys(settings), FakeEngine()) as gw:
        for path in ("//v1/models", "/v1//models", "/v1/models/", "/v1/audio/voices/", "/v1/./models"):
            response = await gw.http.get(path)
            assert response.status_code in (401, 404), (path, response.status_code)


def test_unreadable_keys_file_is_a_settings_error(settings: Settings, tmp_path: Path) -> None:
    from gateway.app import create_app
    from gateway.settings import SettingsError

    missing = msgspec.structs.replace(settings, api_keys_file=str(tmp_path / "no-such-file"))
    with pytest.raises(SettingsError, match="api_keys_file"):
        create_app(missing)
