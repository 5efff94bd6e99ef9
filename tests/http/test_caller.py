"""Who is asking: a matched key is known by a stable id (logged, stored as a voice's owner),
never by the key itself; admin keys are keys too; every request leaves its caller in the
scope."""

from __future__ import annotations

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.http.auth import KeyChecker
from gateway.http.caller import Caller, caller_of, key_id
from gateway.settings import Settings
from harness import in_process

KEYS = ("sk-first-key-0123456789", "sk-second-key-abcdef")
ADMIN = "sk-admin-0000000000"


def test_a_key_is_identified_by_a_stable_id_and_admin_keys_are_keys() -> None:
    checker = KeyChecker(KEYS, admin_keys=(ADMIN,))
    assert checker.count == 3
    first = checker.identify(KEYS[0].encode())
    assert first == (key_id(KEYS[0].encode()), False)
    assert checker.identify(ADMIN.encode()) == (key_id(ADMIN.encode()), True)
    assert checker.identify(b"sk-wrong") is None and not checker.accepts(b"sk-wrong")
    # the same id in another process (a fresh checker) and after a restart; distinct per key
    assert KeyChecker(KEYS).identify(KEYS[0].encode()) == first
    assert len({key_id(k.encode()) for k in (*KEYS, ADMIN)}) == 3
    assert first is not None and first[0].startswith("key_") and KEYS[0] not in first[0]


def test_a_server_without_keys_shows_every_voice_and_a_keyed_one_its_own() -> None:
    assert Caller(client="1.2.3.4", key_id=None).voices.everything
    mine = Caller(client="1.2.3.4", key_id="key_a", keys_enforced=True).voices
    assert mine.owner == "key_a" and not mine.everything
    assert Caller(client="1.2.3.4", key_id="key_x", admin=True, keys_enforced=True).voices.everything


def test_without_the_middleware_there_is_no_caller() -> None:
    with pytest.raises(RuntimeError):
        caller_of({"type": "http", "state": {}})


async def test_the_request_line_names_the_key_id_never_the_key(settings: Settings) -> None:
    keyed = msgspec.structs.replace(settings, api_keys=KEYS)
    with capture_logs() as logs:
        async with in_process(keyed, FakeEngine()) as gw:
            response = await gw.http.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"})
            assert response.status_code == 200
    lines = [e for e in logs if e["event"] == "request" and e.get("path") == "/v1/models"]
    assert lines and lines[-1]["key_id"] == key_id(KEYS[1].encode())
    assert not any(key in repr(logs) for key in KEYS)
