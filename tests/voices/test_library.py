"""The voice library: shipped manifest, lookups, dropped-in clips, create/delete storage."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from media_support import stream_info

from gateway.errors import ConflictError, InvalidRequestError, NotFoundError, PayloadTooLargeError, VoiceNotFoundError
from gateway.voices.clip_files import sniff_container
from gateway.voices.library import VoiceLibrary, sanitize_name

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar")
REPO_VOICES = Path(__file__).resolve().parents[2] / "voices"




@pytest.fixture
def library(builtin_dir: Path, tmp_path: Path) -> VoiceLibrary:
    return VoiceLibrary(builtin_dir, tmp_path / "user")


# ---- the shipped voices ----------------------------------------------------------------------


def test_every_openai_name_resolves_to_a_builtin_clip(tmp_path: Path) -> None:
    lib = VoiceLibrary(REPO_VOICES, tmp_path / "user")
    for name in OPENAI_VOICES:
        voice = lib.get(name)
        assert voice.source == "builtin" and voice.clip is not None and voice.clip.is_file(), name
        assert name in voice.aliases
    default = lib.get("default")
    assert default.source == "checkpoint" and default.clip is None


def test_shipped_clips_are_small_24k_mono_flac_of_6_to_10_s() -> None:
    manifest = json.loads((REPO_VOICES / "manifest.json").read_text())
    clips = [v["clip"] for v in manifest["voices"] if v["clip"]]
    assert 4 <= len(clips) <= 6
    for clip in clips:
        path = REPO_VOICES / clip
        assert path.stat().st_size < 300_000, clip
        info = stream_info(path)
        assert (info.codec, info.sample_rate, info.channels) == ("flac", 24000, 1), clip
        assert 6.0 <= info.stated_s <= 10.0, clip


# ---- lookups ---------------------------------------------------------------------------------


def test_lookup_is_case_insensitive_by_id_name_and_alias(library: VoiceLibrary) -> None:
    assert library.get("ALLOY").id == library.get("aria").id == library.get(" Aria ").id
    assert [v.id for v in library.list()][:1] == ["default"]


def test_unknown_voice_names_the_voice(library: VoiceLibrary) -> None:
    with pytest.raises(VoiceNotFoundError) as info:
        library.get("nobody-here")
    assert info.value.param == "voice" and "nobody-here" in info.value.message


def test_dropped_in_clips_appear_without_restart(library: VoiceLibrary, audio_file) -> None:
    assert [v for v in library.list() if v.source == "user"] == []
    shutil.copy(audio_file("x.wav"), library.user_dir / "My Voice!.wav")
    shutil.copy(audio_file("x.mp3"), library.user_dir / "second.mp3")
    (library.user_dir / "notes.txt").write_text("not a voice")
    (library.user_dir / ".hidden.wav").write_bytes(b"")
    shutil.copy(audio_file("y.wav"), library.user_dir / "ALLOY.wav")  # clashes with a built-in alias
    users = {v.name: v for v in library.list() if v.source == "user"}
    assert set(users) == {"My-Voice", "second"}
    assert library.get("my-voice").clip == library.user_dir / "My Voice!.wav"
    assert library.get("alloy").source == "builtin"  # built-ins always win
    (library.user_dir / "second.mp3").unlink()
    with pytest.raises(VoiceNotFoundError):
        library.get("second")


def test_sanitize_name() -> None:
    assert sanitize_name("My Voice (take 2)") == "My-Voice-take-2"
    assert sanitize_name("../../etc/passwd") == "etc-passwd"
    assert sanitize_name("语音") == ""
    assert len(sanitize_name("a" * 200)) == 64


# ---- create ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("clip.wav", ()),
        ("clip.flac", ()),
        ("clip.mp3", ()),
        ("clip.ogg", ("-c:a", "libopus")),
        ("clip.m4a", ()),  # the MP4 index (moov) sits at the end: needs a seekable input
        ("clip.aac", ()),
        ("clip.webm", ("-c:a", "libopus")),
        ("clip.aiff", ()),
    ],
)
def test_create_stores_24k_mono_flac_from_any_format(library: VoiceLibrary, audio_file, name, extra) -> None:
    upload = audio_file(name, 5.0, extra=extra)
    voice = library.create("my_voice-1", upload.read_bytes(), consent="I recorded this myself")
    assert voice.id.startswith("voice_") and voice.name == "my_voice-1" and voice.source == "user"
    assert voice.clip == library.user_dir / "created" / voice.id / "clip.flac"
    info = stream_info(voice.clip)
    assert (info.codec, info.sample_rate, info.channels) == ("flac", 24000, 1)
    assert abs(info.stated_s - 5.0) < 0.1
    meta = json.loads((voice.clip.parent / "voice.json").read_text())
    assert meta["name"] == "my_voice-1" and meta["consent"] == "I recorded this myself"
    assert library.get("MY_VOICE-1") == voice == library.get(voice.id)


def test_created_voices_survive_restart(builtin_dir: Path, tmp_path: Path, audio_file) -> None:
    first = VoiceLibrary(builtin_dir, tmp_path / "user")
    voice = first.create("keeper", audio_file("a.wav").read_bytes(), None)
    again = VoiceLibrary(builtin_dir, tmp_path / "user")
    assert again.get("keeper") == voice
    assert voice in again.list()


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "../evil", "voice/x", "ünï", "a.b"])
def test_create_rejects_unsafe_names(library: VoiceLibrary, audio_file, name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        library.create(name, audio_file("a.wav").read_bytes(), None)
    assert info.value.param == "name"


@pytest.mark.parametrize("name", ["aria", "ALLOY", "default", "Taken"])
def test_create_rejects_existing_names(library: VoiceLibrary, audio_file, name: str) -> None:
    data = audio_file("a.wav").read_bytes()
    library.create("taken", data, None)
    with pytest.raises(ConflictError) as info:
        library.create(name, data, None)
    assert info.value.status_code == 409
    assert len([v for v in library.list() if v.source == "user"]) == 1


def test_create_rejects_a_name_taken_by_a_dropped_in_file(library: VoiceLibrary, audio_file) -> None:
    shutil.copy(audio_file("a.wav"), library.user_dir / "dropped.wav")
    with pytest.raises(ConflictError):
        library.create("Dropped", audio_file("b.wav").read_bytes(), None)


def test_concurrent_creates_of_one_name_make_one_voice(library: VoiceLibrary, audio_file) -> None:
    data = audio_file("a.wav").read_bytes()
    results: list[object] = []

    def create() -> None:
        try:
            results.append(library.create("race", data, None))
        except ConflictError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(r, ConflictError) for r in results) == 1
    assert [v.name for v in library.list() if v.source == "user"] == ["race"]
    assert sorted(p.name for p in (library.user_dir / "created").iterdir()) == [library.get("race").id]


def test_create_rejects_oversized_uploads(builtin_dir: Path, tmp_path: Path, audio_file) -> None:
    lib = VoiceLibrary(builtin_dir, tmp_path / "user", max_clip_bytes=1000)
    with pytest.raises(PayloadTooLargeError) as info:
        lib.create("big", audio_file("a.wav").read_bytes(), None)
    assert info.value.status_code == 413


@pytest.mark.parametrize(
    ("what", "make"),
    [
        ("empty", lambda f: b""),
        ("text", lambda f: b"hello, I am definitely a wav file" * 10),
        ("fake header", lambda f: b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x00" * 200),
        ("too short", lambda f: f("short.wav", 2.0).read_bytes()),
        ("too long", lambda f: f("long.flac", 31.0).read_bytes()),
        ("silent", lambda f: f("silent.wav", 5.0, source="anullsrc=r=44100:cl=stereo:d=5").read_bytes()),
        ("video only", lambda f: f("video.mp4", 5.0, source="testsrc=d=5:s=64x64", extra=("-an",)).read_bytes()),
    ],
)
def test_create_rejects_what_is_not_a_usable_clip(library: VoiceLibrary, audio_file, what, make) -> None:
    with pytest.raises(InvalidRequestError) as info:
        library.create("bad", make(audio_file), None)
    assert info.value.param == "audio_sample", what
    assert info.value.status_code == 400
    assert list((library.user_dir / "created").iterdir()) == []


def test_playlists_cannot_make_ffmpeg_read_other_files(library: VoiceLibrary, audio_file) -> None:
    secret = audio_file("secret.wav", 5.0)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{secret}\n#EXT-X-ENDLIST\n".encode()
    concat = f"ffconcat version 1.0\nfile '{secret}'\n".encode()
    for payload in (playlist, concat):
        with pytest.raises(InvalidRequestError):
            library.create("sneaky", payload, None)


def test_sniffing_names_the_demuxer(audio_file) -> None:
    assert sniff_container(audio_file("a.wav").read_bytes()) == "wav"
    assert sniff_container(audio_file("a.mp3").read_bytes()) == "mp3"
    assert sniff_container(audio_file("a.aac").read_bytes()) == "aac"
    assert sniff_container(audio_file("a.m4a").read_bytes()) == "mov"
    assert sniff_container(b"#EXTM3U\n") is None


# ---- crash safety ----------------------------------------------------------------------------


def test_a_crash_mid_create_leaves_no_voice(library: VoiceLibrary, audio_file, monkeypatch) -> None:
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if Path(src).name.startswith(".staging-"):
            raise OSError("disk vanished")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    with pytest.raises(OSError):
        library.create("halfway", audio_file("a.wav").read_bytes(), None)
    monkeypatch.undo()
    assert list((library.user_dir / "created").iterdir()) == []
    with pytest.raises(VoiceNotFoundError):
        library.get("halfway")


def test_leftovers_of_a_killed_process_are_not_voices(builtin_dir: Path, tmp_path: Path, audio_file) -> None:
    lib = VoiceLibrary(builtin_dir, tmp_path / "user")
    created = lib.user_dir / "created"
    # kill -9 during assembly: a staging folder; during an old-style partial write: no metadata.
    staging = created / ".staging-voice_0123456789abcdef01234567"
    staging.mkdir()
    shutil.copy(audio_file("a.wav"), staging / "clip.flac")
    partial = created / "voice_aaaaaaaaaaaaaaaaaaaaaaaa"
    partial.mkdir()
    shutil.copy(audio_file("b.wav"), partial / "clip.flac")
    (created / "voice_bbbbbbbbbbbbbbbbbbbbbbbb").mkdir()
    ((created / "voice_bbbbbbbbbbbbbbbbbbbbbbbb") / "voice.json").write_text("{not json")
    assert [v for v in lib.list() if v.source == "user"] == []
    old = time.time() - 2 * 3600
    os.utime(staging, (old, old))
    VoiceLibrary(builtin_dir, tmp_path / "user")  # start-up sweeps stale staging folders
    assert not staging.exists()


# ---- delete ----------------------------------------------------------------------------------


def test_delete_removes_a_created_voice_for_good(builtin_dir: Path, tmp_path: Path, audio_file) -> None:
    lib = VoiceLibrary(builtin_dir, tmp_path / "user")
    voice = lib.create("gone-soon", audio_file("a.wav").read_bytes(), None)
    lib.delete(voice.id)
    with pytest.raises(VoiceNotFoundError):
        lib.get("gone-soon")
    assert list((lib.user_dir / "created").iterdir()) == []
    with pytest.raises(VoiceNotFoundError):
        VoiceLibrary(builtin_dir, tmp_path / "user").get(voice.id)
    with pytest.raises(NotFoundError):
        lib.delete(voice.id)


def test_delete_finds_a_voice_by_name_like_get(builtin_dir: Path, tmp_path: Path, audio_file) -> None:
    lib = VoiceLibrary(builtin_dir, tmp_path / "user")
    voice = lib.create("By-Name", audio_file("a.wav").read_bytes(), None)
    assert lib.get("by-name") == voice
    assert lib.delete("BY-NAME").id == voice.id
    with pytest.raises(VoiceNotFoundError):
        lib.get(voice.id)


@pytest.mark.parametrize("voice_id", ["aria", "default", "alloy"])
def test_builtins_cannot_be_deleted(library: VoiceLibrary, voice_id: str) -> None:
    with pytest.raises(InvalidRequestError):
        library.delete(voice_id)
    assert library.get(voice_id)


@pytest.mark.parametrize("voice_id", ["nope", "../created", "voice_" + "0" * 24, "/etc", ""])
def test_delete_unknown_is_not_found(library: VoiceLibrary, voice_id: str) -> None:
    with pytest.raises(NotFoundError) as info:
        library.delete(voice_id)
    assert info.value.status_code == 404


def test_dropped_in_files_are_not_deleted_through_the_api(library: VoiceLibrary, audio_file) -> None:
    shutil.copy(audio_file("a.wav"), library.user_dir / "mine.wav")
    with pytest.raises(InvalidRequestError):
        library.delete("mine")
    assert (library.user_dir / "mine.wav").is_file()
