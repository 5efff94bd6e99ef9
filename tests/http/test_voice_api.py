"""The voice library API: create (httpx multipart and the OpenAI SDK), list, get, delete, use
by id and by name; size/content/name validation; crash safety; voices survive a restart."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from gateway.audio.ffmpeg_binary import ffmpeg_exe
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from gateway.voices.library import VoiceLibrary
from harness import in_process


def tone_clip(seconds: float, *, fmt: str = "wav", frequency: int = 220, volume: float = 0.5) -> bytes:
    """A real audio file made by FFmpeg (a tone with a little vibrato, like a voice would have)."""
    source = f"sine=frequency={frequency}:duration={seconds}:sample_rate=24000,volume={volume}"
    args = {"wav": ["-f", "wav"], "mp3": ["-c:a", "libmp3lame", "-f", "mp3"], "flac": ["-f", "flac"]}[fmt]
    out = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", source, "-ac", "1", *args, "pipe:1"],
        capture_output=True,
        check=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def clip() -> bytes:
    return tone_clip(5.0)


def upload(name: str, data: bytes, filename: str = "clip.wav", **fields: str) -> dict[str, object]:
    return {"data": {"name": name, **fields}, "files": {"audio_sample": (filename, data, "audio/wav")}}


async def test_create_list_get_use_delete(settings: Settings, clip: bytes, valid_audio, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        created = await gw.http.post("/v1/audio/voices", **upload("my-voice", clip, consent="cons_123"))
        assert created.status_code == 200, created.text
        voice = created.json()
        assert voice["object"] == "audio.voice" and voice["type"] == "audio_sample"
        assert voice["name"] == "my-voice" and voice["id"].startswith("voice_")
        assert abs(voice["created_at"] - time.time()) < 60

        listed = (await gw.http.get("/v1/audio/voices")).json()["data"]
        assert voice["id"] in {v["id"] for v in listed}
        by_id = (await gw.http.get(f"/v1/audio/voices/{voice['id']}")).json()
        by_name = (await gw.http.get("/v1/audio/voices/MY-VOICE")).json()
        assert by_id == by_name == voice

        # used by id (object form) and by name; it is a different voice from the default one
        for ref in ({"id": voice["id"]}, "my-voice"):
            response = await gw.http.post(
                "/v1/audio/speech", json={"model": "tts-1", "input": "Hello.", "voice": ref, "response_format": "wav"}
            )
            assert response.status_code == 200, response.text
            valid_audio(response.content, "wav")
        await gw.http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hello.", "voice": "alloy"})
        keys = [job.voice.key for job in gw.engine.jobs]
        assert keys[0] == keys[1] != keys[2]

        deleted = await gw.http.delete(f"/v1/audio/voices/{voice['id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": voice["id"], "object": "audio.voice.deleted", "deleted": True}
        api_error(await gw.http.get(f"/v1/audio/voices/{voice['id']}"), 404)
        api_error(await gw.http.delete(f"/v1/audio/voices/{voice['id']}"), 404)
        gone = await gw.http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "my-voice"})
        api_error(gone, 400, param="voice")


async def test_delete_by_name_answers_with_the_id(settings: Settings, clip: bytes, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        voice = (await gw.http.post("/v1/audio/voices", **upload("my-voice", clip))).json()
        assert (await gw.http.get("/v1/audio/voices/my-voice")).status_code == 200
        deleted = await gw.http.delete("/v1/audio/voices/my-voice")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"id": voice["id"], "object": "audio.voice.deleted", "deleted": True}
        api_error(await gw.http.get(f"/v1/audio/voices/{voice['id']}"), 404)
        api_error(await gw.http.delete("/v1/audio/voices/my-voice"), 404, param="voice_id")


async def test_openai_sdk_creates_and_deletes(settings: Settings, clip: bytes) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        voice = await gw.sdk.audio.voices.create(
            name="sdk-voice", audio_sample=("me.wav", clip, "audio/wav"), consent="cons_recorded"
        )
        assert voice.object == "audio.voice" and voice.name == "sdk-voice" and voice.type == "audio_sample"
        audio = await gw.sdk.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="From the SDK.")
        assert audio.content
        deleted = await gw.sdk.audio.voices.delete(voice.id)
        assert deleted.deleted and deleted.id == voice.id and deleted.object == "audio.voice.deleted"
        with pytest.raises(openai.NotFoundError):
            await gw.sdk.audio.voices.delete(voice.id)


async def test_other_audio_formats_are_accepted(settings: Settings) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        for fmt in ("mp3", "flac"):
            response = await gw.http.post(
                "/v1/audio/voices", **upload(f"from-{fmt}", tone_clip(4.0, fmt=fmt), filename=f"c.{fmt}")
            )
            assert response.status_code == 200, (fmt, response.text)


async def test_upload_size_limit_is_413(settings: Settings, api_error) -> None:
    limit = 10 * 1024 * 1024
    assert settings.max_upload_bytes == limit  # the documented default
    async with in_process(settings, FakeEngine()) as gw:
        wav = tone_clip(4.0)
        just_over = wav + b"\0" * (limit + 1 - len(wav))
        api_error(await gw.http.post("/v1/audio/voices", **upload("big", just_over)), 413)
        far_over = b"\0" * (limit + 2 * 1024 * 1024)
        api_error(await gw.http.post("/v1/audio/voices", **upload("bigger", far_over)), 413)
        names = {v["name"] for v in (await gw.http.get("/v1/audio/voices")).json()["data"]}
        assert not {"big", "bigger"} & names


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("not audio", lambda: b"this is a text file, not audio" * 100),
        ("random bytes", lambda: random.Random(1).randbytes(50_000)),
        ("a wav header with garbage", lambda: tone_clip(4.0)[:44] + random.Random(2).randbytes(20_000)),
        ("too short", lambda: tone_clip(1.0)),
        ("too long", lambda: tone_clip(45.0)),
        ("silent", lambda: tone_clip(5.0, volume=0.0)),
        ("empty", lambda: b""),
    ],
)
async def test_bad_clips_are_400(settings: Settings, case: str, make, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        response = await gw.http.post("/v1/audio/voices", **upload("bad-clip", make()))
        error = api_error(response, 400, param="audio_sample")
        assert error["message"], case
        assert "bad-clip" not in {v["name"] for v in (await gw.http.get("/v1/audio/voices")).json()["data"]}


async def test_duplicate_names_are_409(settings: Settings, clip: bytes, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        assert (await gw.http.post("/v1/audio/voices", **upload("twin", clip))).status_code == 200
        api_error(await gw.http.post("/v1/audio/voices", **upload("twin", clip)), 409, param="name")
        api_error(await gw.http.post("/v1/audio/voices", **upload("TWIN", clip)), 409, param="name")
        api_error(await gw.http.post("/v1/audio/voices", **upload("alloy", clip)), 409, param="name")


@pytest.mark.parametrize(
    "name", ["../x", "..", "a/b", "a\\b", "a\x00b", "", " ", "x" * 65, "with space", "ünï", "/etc/passwd", "a.b"]
)
async def test_unsafe_names_are_rejected(settings: Settings, clip: bytes, tmp_path: Path, name: str, api_error) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    async with in_process(settings, FakeEngine()) as gw:
        response = await gw.http.post("/v1/audio/voices", **upload(name, clip))
        api_error(response, 400)
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    # nothing was written outside the app's own folders (cache, voices)
    allowed = (Path("cache"), Path("user-voices"))
    assert all(p in before or p.parts[0] in {a.parts[0] for a in allowed} for p in after)
    assert not list((tmp_path / "user-voices").rglob("*.flac"))


async def test_ids_in_paths_cannot_reach_other_files(settings: Settings, clip: bytes, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        voice = (await gw.http.post("/v1/audio/voices", **upload("keep-me", clip))).json()
        for raw in ("..%2F..%2Fetc%2Fpasswd", "..%2Fcreated", f"..%2Fcreated%2F{voice['id']}", "%2E%2E", "created"):
            response = await gw.http.delete(f"/v1/audio/voices/{raw}")
            assert response.status_code in (400, 404), (raw, response.status_code)
            response = await gw.http.get(f"/v1/audio/voices/{raw}")
            assert response.status_code in (400, 404), (raw, response.status_code)
        assert (await gw.http.get(f"/v1/audio/voices/{voice['id']}")).status_code == 200


async def test_form_mistakes_are_400(settings: Settings, clip: bytes, api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        api_error(await gw.http.post("/v1/audio/voices", data={"name": "no-file"}), 400)
        api_error(
            await gw.http.post("/v1/audio/voices", files={"audio_sample": ("c.wav", clip, "audio/wav")}), 400
        )
        api_error(await gw.http.post("/v1/audio/voices", json={"name": "json", "audio_sample": "AAAA"}), 400)
        api_error(
            await gw.http.post(
                "/v1/audio/voices",
                content=b"--x\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbroken",
                headers={"Content-Type": "multipart/form-data; boundary=x"},
            ),
            400,
        )


@pytest.mark.parametrize(("fields", "missing"), [({"name": "no-clip"}, "audio_sample"), ({}, "name")])
async def test_a_missing_form_field_is_named(settings: Settings, clip: bytes, fields, missing, api_error) -> None:
    # a multipart form with the other field (and an unrelated file, so httpx sends multipart)
    file_field = "other" if missing == "audio_sample" else "audio_sample"
    files = {file_field: ("c.wav", clip, "audio/wav")}
    async with in_process(settings, FakeEngine()) as gw:
        error = api_error(await gw.http.post("/v1/audio/voices", data=fields, files=files), 400, param=missing)
        assert f"missing required field '{missing}'" in error["message"]


async def test_voices_survive_a_restart_without_recomputing(settings: Settings, clip: bytes) -> None:
    first_engine = FakeEngine()
    async with in_process(settings, first_engine) as gw:
        voice = (await gw.http.post("/v1/audio/voices", **upload("persistent", clip))).json()
        ok = await gw.http.post("/v1/audio/speech", json={"model": "tts-1", "input": "One.", "voice": "persistent"})
        assert ok.status_code == 200
    assert first_engine.conditionals_computed == 1
    second_engine = FakeEngine()
    async with in_process(settings, second_engine) as gw:
        again = (await gw.http.get("/v1/audio/voices/persistent")).json()
        assert again == voice
        ok = await gw.http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Two.", "voice": {"id": voice["id"]}})
        assert ok.status_code == 200
    assert second_engine.conditionals_computed == 0  # the clip did not change: cached on disk
    assert first_engine.jobs[0].voice.key == second_engine.jobs[0].voice.key


def test_leftovers_of_a_crash_are_ignored_and_cleaned(settings: Settings, clip: bytes, tmp_path: Path) -> None:
    """What a kill -9 mid-upload can leave: a staging folder, a temp file, a voice folder
    without its clip. None of them is a voice; old staging folders are removed at start."""
    user_dir = settings.resolved_voices_dir()
    library = VoiceLibrary(settings.resolved_builtin_voices_dir(), user_dir)
    good = library.create("survivor", clip)
    created = user_dir / "created"
    staging = created / ".staging-voice_0123456789abcdef01234567"
    staging.mkdir()
    (staging / "clip.flac").write_bytes(b"fLaC half written")
    old = time.time() - 7200
    os.utime(staging, (old, old))
    (created / good.id / ".voice.json.dead.tmp").write_bytes(b'{"id": "trunc')
    broken = created / "voice_fedcba9876543210fedcba98"
    broken.mkdir()
    (broken / "voice.json").write_text(json.dumps({"id": broken.name, "name": "broken", "created_at": 1}))

    restarted = VoiceLibrary(settings.resolved_builtin_voices_dir(), user_dir)
    names = {v.name for v in restarted.list()}
    assert "survivor" in names and "broken" not in names
    assert not staging.exists()
    assert restarted.get("survivor").clip is not None


_CRASH_SCRIPT = """
import sys
from pathlib import Path
from gateway.voices.library import VoiceLibrary
library = VoiceLibrary(Path(sys.argv[1]), Path(sys.argv[2]))
clip = Path(sys.argv[3]).read_bytes()
print("ready", flush=True)
for i in range(1000):
    library.create(f"crash-{i}", clip)
"""


def test_kill_9_mid_upload_leaves_old_or_new_state(settings: Settings, clip: bytes, tmp_path: Path) -> None:
    clip_path = tmp_path / "clip.wav"
    clip_path.write_bytes(clip)
    builtin, user_dir = settings.resolved_builtin_voices_dir(), settings.resolved_voices_dir()
    rng = random.Random(7)
    # kill at different points of the create cycle (decode, FLAC write, fsync, rename)
    for delay in (0.05, 0.3, 0.8, 1.5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_SCRIPT, str(builtin), str(user_dir), str(clip_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()
        assert ready == b"ready", proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(delay + rng.uniform(0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        library = VoiceLibrary(builtin, user_dir)
        for voice in library.list():
            if voice.source != "user":
                continue
            # every voice that is listed is complete: metadata and a decodable clip
            assert voice.clip is not None and voice.clip.is_file()
            meta = json.loads((voice.clip.parent / "voice.json").read_text())
            assert meta["name"] == voice.name
            decoded = subprocess.run(
                [ffmpeg_exe(), "-v", "error", "-i", str(voice.clip), "-f", "null", "-"], capture_output=True
            )
            assert decoded.returncode == 0 and not decoded.stderr, decoded.stderr
    assert any(v.name.startswith("crash-") for v in VoiceLibrary(builtin, user_dir).list())




async def test_upload_bursts_are_bounded(settings: Settings, clip: bytes, api_error) -> None:
    """Each upload decodes with FFmpeg: a burst gets a bounded number processed, the rest a
    429 at once, so uploads cannot starve speech of CPU."""
    from gateway.speech.admission import UPLOADS_IN_FLIGHT, UPLOADS_QUEUED

    burst = UPLOADS_IN_FLIGHT + UPLOADS_QUEUED + 4
    async with in_process(settings, FakeEngine()) as gw:
        responses = await asyncio.gather(
            *(gw.http.post("/v1/audio/voices", **upload(f"burst-{i}", clip)) for i in range(burst))
        )
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) == UPLOADS_IN_FLIGHT + UPLOADS_QUEUED, codes
        for response in responses:
            if response.status_code == 429:
                api_error(response, 429, code="server_overloaded")
                assert response.headers["retry-after"]
        speech = await gw.http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "burst-0"})
        assert speech.status_code == 200
