"""Voices belong to the API key that created them: with two keys, key B can neither list, read,
use nor delete key A's voice, and every answer it gets is the one a voice nobody created
gets (so B cannot even learn that the name or id exists). Built-in, dropped-in and keyless
voices stay shared; an admin key sees and deletes every voice; ownership is stored with the
voice (as the key's id, never the key), so it survives a restart and holds in every process
that shares the voices folder. Driven over HTTP, with the real OpenAI SDK where it has a call."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.engine.fake import FakeEngine
from gateway.http.caller import key_id
from gateway.settings import Settings
from harness import in_process

KEY_A, KEY_B, ADMIN = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-admin-key-5555555555"
SPEECH = {"model": "tts-1", "input": "Hello there.", "response_format": "wav"}


def tone(frequency: int) -> bytes:
    return subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", f"sine=frequency={frequency}:duration=4:sample_rate=24000",
         "-f", "wav", "pipe:1"],
        capture_output=True, check=True,
    ).stdout


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {"a": tone(220), "b": tone(330), "shared": tone(440)}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, api_keys=(KEY_A, KEY_B), admin_api_keys=(ADMIN,))


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(gw: Any, key: str | None, name: str, clip: bytes) -> dict[str, Any]:
    response = await gw.http.post(
        "/v1/audio/voices",
        data={"name": name},
        files={"audio_sample": ("clip.wav", clip, "audio/wav")},
        headers=as_key(key) if key else {},
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def names(response: Any) -> set[str]:
    assert response.status_code == 200, response.text
    return {voice["name"] for voice in response.json()["data"]}


def unknown_is_the_same(mine: dict[str, Any], nobody: dict[str, Any], asked: str, invented: str) -> None:
    """Two error envelopes are identical once the name each quotes is swapped."""
    assert mine["error"] == json.loads(json.dumps(nobody).replace(invented, asked))["error"], (mine, nobody)


async def test_another_keys_voice_does_not_exist_for_it(keyed: Settings, clips, api_error) -> None:
    async with in_process(keyed, FakeEngine()) as gw:
        voice = await create(gw, KEY_A, "narrator", clips["a"])
        invented = "voice_" + "0" * 24

        # listing (also the OpenAI-compatible GET /v1/audio/voices the SDK reads)
        assert "narrator" in names(await gw.http.get("/v1/audio/voices", headers=as_key(KEY_A)))
        assert "narrator" not in names(await gw.http.get("/v1/audio/voices", headers=as_key(KEY_B)))

        for asked in (voice["id"], "narrator", "NARRATOR"):
            # read: the 404 of a voice nobody created, byte for byte but for the name quoted
            theirs = await gw.http.get(f"/v1/audio/voices/{asked}", headers=as_key(KEY_B))
            nobody = await gw.http.get(f"/v1/audio/voices/{invented}", headers=as_key(KEY_B))
            api_error(theirs, 404)
            unknown_is_the_same(theirs.json(), nobody.json(), asked, invented)
            # use: the speech route's 400 `voice`, the same as an unknown voice
            spoken = await gw.http.post("/v1/audio/speech", json={**SPEECH, "voice": asked}, headers=as_key(KEY_B))
            unknown = await gw.http.post("/v1/audio/speech", json={**SPEECH, "voice": invented}, headers=as_key(KEY_B))
            api_error(spoken, 400, param="voice", code="voice_not_found")
            unknown_is_the_same(spoken.json(), unknown.json(), asked, invented)
            # delete: 404, and the voice is still there for its owner
            deleted = await gw.http.delete(f"/v1/audio/voices/{asked}", headers=as_key(KEY_B))
            api_error(deleted, 404)
        by_id = await gw.http.post("/v1/audio/speech", json={**SPEECH, "voice": {"id": voice["id"]}}, headers=as_key(KEY_B))
        api_error(by_id, 400, param="voice", code="voice_not_found")

        # the real SDK sees the same: BadRequestError for B, audio for A
        sdk_b = openai.AsyncOpenAI(api_key=KEY_B, base_url="http://gateway.test/v1", http_client=gw.http, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            await sdk_b.audio.speech.create(model="tts-1", voice="narrator", input="Hi.", response_format="wav")
        sdk_a = openai.AsyncOpenAI(api_key=KEY_A, base_url="http://gateway.test/v1", http_client=gw.http, max_retries=0)
        audio = await sdk_a.audio.speech.create(model="tts-1", voice="narrator", input="Hi.", response_format="wav")
        assert audio.content[:4] == b"RIFF"
        assert (await gw.http.get(f"/v1/audio/voices/{voice['id']}", headers=as_key(KEY_A))).status_code == 200


async def test_each_key_has_its_own_names(keyed: Settings, clips) -> None:
    """B may create a voice named like A's (a 409 would tell B the name is taken); each key's
    name then reaches its own voice."""
    engine = FakeEngine()
    async with in_process(keyed, engine) as gw:
        mine = await create(gw, KEY_A, "narrator", clips["a"])
        theirs = await create(gw, KEY_B, "narrator", clips["b"])
        assert mine["id"] != theirs["id"]
        keys_used = {}
        for key in (KEY_A, KEY_B):
            response = await gw.http.post("/v1/audio/speech", json={**SPEECH, "voice": "narrator"}, headers=as_key(key))
            assert response.status_code == 200
            keys_used[key] = engine.jobs[-1].voice.key
        assert keys_used[KEY_A] != keys_used[KEY_B]
        # a name taken in its own namespace is still a 409
        again = await gw.http.post(
            "/v1/audio/voices", data={"name": "Narrator"}, files={"audio_sample": ("c.wav", clips["a"], "audio/wav")},
            headers=as_key(KEY_A),
        )
        assert again.status_code == 409
        # and a shared (built-in) name is taken for everyone
        alloy = await gw.http.post(
            "/v1/audio/voices", data={"name": "alloy"}, files={"audio_sample": ("c.wav", clips["a"], "audio/wav")},
            headers=as_key(KEY_B),
        )
        assert alloy.status_code == 409


async def test_an_admin_key_sees_uses_and_deletes_every_voice(keyed: Settings, clips, api_error) -> None:
    async with in_process(keyed, FakeEngine()) as gw:
        a = await create(gw, KEY_A, "narrator", clips["a"])
        b = await create(gw, KEY_B, "narrator", clips["b"])
        listed = (await gw.http.get("/v1/audio/voices", headers=as_key(ADMIN))).json()["data"]
        assert {a["id"], b["id"]} <= {v["id"] for v in listed}
        assert {"aria", "narrator"} <= {v["name"] for v in listed}
        for voice in (a, b):
            assert (await gw.http.get(f"/v1/audio/voices/{voice['id']}", headers=as_key(ADMIN))).status_code == 200
            spoken = await gw.http.post(
                "/v1/audio/speech", json={**SPEECH, "voice": {"id": voice["id"]}}, headers=as_key(ADMIN)
            )
            assert spoken.status_code == 200
        deleted = await gw.http.delete(f"/v1/audio/voices/{b['id']}", headers=as_key(ADMIN))
        assert deleted.status_code == 200 and deleted.json()["id"] == b["id"]
        assert "narrator" not in names(await gw.http.get("/v1/audio/voices", headers=as_key(KEY_B)))
        assert "narrator" in names(await gw.http.get("/v1/audio/voices", headers=as_key(KEY_A)))
        # the owner deletes its own
        assert (await gw.http.delete("/v1/audio/voices/narrator", headers=as_key(KEY_A))).status_code == 200


async def test_ownership_is_stored_as_the_key_id_and_survives_a_restart(keyed: Settings, clips) -> None:
    async with in_process(keyed, FakeEngine()) as gw:
        voice = await create(gw, KEY_A, "narrator", clips["a"])
    folder = Path(keyed.resolved_voices_dir()) / "created" / voice["id"]
    meta = json.loads((folder / "voice.json").read_text())
    assert meta["owner"] == key_id(KEY_A.encode()) and meta["owner"].startswith("key_")
    stored = b"".join(p.read_bytes() for p in Path(keyed.resolved_voices_dir()).rglob("*") if p.is_file())
    for key in (KEY_A, KEY_B, ADMIN):
        assert key.encode() not in stored
    async with in_process(keyed, FakeEngine()) as gw:  # a new process on the same voices folder
        assert "narrator" in names(await gw.http.get("/v1/audio/voices", headers=as_key(KEY_A)))
        assert "narrator" not in names(await gw.http.get("/v1/audio/voices", headers=as_key(KEY_B)))


async def test_two_processes_sharing_the_voices_folder_agree(keyed: Settings, clips, tmp_path: Path) -> None:
    """As two HTTP tiers of a cluster over one voice store: created on one, owned on both."""
    other = msgspec.structs.replace(keyed, cache_dir=str(tmp_path / "other-cache"))
    async with in_process(keyed, FakeEngine()) as first, in_process(other, FakeEngine()) as second:
        voice = await create(first, KEY_A, "narrator", clips["a"])
        assert (await second.http.get(f"/v1/audio/voices/{voice['id']}", headers=as_key(KEY_A))).status_code == 200
        assert (await second.http.get(f"/v1/audio/voices/{voice['id']}", headers=as_key(KEY_B))).status_code == 404
        assert (await second.http.delete(f"/v1/audio/voices/{voice['id']}", headers=as_key(KEY_B))).status_code == 404
        assert (await second.http.delete(f"/v1/audio/voices/{voice['id']}", headers=as_key(KEY_A))).status_code == 200
        assert (await first.http.get(f"/v1/audio/voices/{voice['id']}", headers=as_key(KEY_A))).status_code == 404


async def test_shared_voices_stay_shared(settings: Settings, keyed: Settings, clips, api_error) -> None:
    """A voice created on a server without keys, and a clip dropped into the folder, are every
    key's; a key cannot delete the keyless voice (only an admin can)."""
    async with in_process(settings, FakeEngine()) as gw:
        keyless = await create(gw, None, "house", clips["shared"])
        # without keys everything behaves as before: one namespace, anyone deletes
        temp = await create(gw, None, "temp", clips["a"])
        assert (await gw.http.delete(f"/v1/audio/voices/{temp['id']}")).status_code == 200
    shutil.copy(Path(settings.resolved_voices_dir()) / "created" / keyless["id"] / "clip.flac",
                Path(settings.resolved_voices_dir()) / "dropped.flac")
    async with in_process(keyed, FakeEngine()) as gw:
        for key in (KEY_A, KEY_B):
            assert {"house", "dropped", "aria"} <= names(await gw.http.get("/v1/audio/voices", headers=as_key(key)))
            spoken = await gw.http.post("/v1/audio/speech", json={**SPEECH, "voice": "house"}, headers=as_key(key))
            assert spoken.status_code == 200
        refused = await gw.http.delete("/v1/audio/voices/house", headers=as_key(KEY_A))
        error = api_error(refused, 403, code="forbidden")
        assert "admin" in error["message"]
        assert (await gw.http.delete("/v1/audio/voices/house", headers=as_key(ADMIN))).status_code == 200
