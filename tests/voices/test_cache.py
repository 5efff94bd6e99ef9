"""VoiceCache: content-keyed, single-flight, memory LRU over an on-disk cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import gateway.voices.cache as voice_cache_mod
from gateway.engine.fake import FakeEngine
from gateway.errors import EngineError, InvalidRequestError, VoiceNotFoundError
from gateway.voices.cache import VoiceCache, model_dir_name
from gateway.voices.library import VoiceInfo, VoiceLibrary


class CountingEngine:
    """The engine methods VoiceCache uses, counting every call; compute is slow and blocking."""

    def __init__(self, model_id: str = "counting-model", *, builtin: Any = None, compute_s: float = 0.2) -> None:
        self.model_id = model_id
        self.builtin = builtin
        self.compute_s = compute_s
        self.computed: list[Path] = []
        self.loaded: list[Path] = []
        self.compute_threads: set[int] = set()
        self.fail_next: Exception | None = None

    def weights_id(self, model: str) -> str:
        return self.model_id if model == "chatterbox" else f"{self.model_id}/{model}"

    def compute_conditionals(self, clip: Path, model: str = "chatterbox") -> dict[str, Any]:
        self.compute_threads.add(threading.get_ident())
        time.sleep(self.compute_s)  # blocking on purpose: it must not run on the event loop
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.computed.append(clip)
        return {"sha": hashlib.sha256(clip.read_bytes()).hexdigest(), "model": self.weights_id(model)}

    def save_conditionals(self, conditionals: Any, path: Path) -> None:
        path.write_text(json.dumps(conditionals))

    def load_conditionals(self, path: Path, model: str = "chatterbox") -> Any:
        self.loaded.append(path)
        return json.loads(path.read_text())

    def builtin_conditionals(self, model: str = "chatterbox") -> Any | None:
        return self.builtin


def clip_voice(path: Path, data: bytes, name: str | None = None) -> VoiceInfo:
    path.write_bytes(data)
    return VoiceInfo(name or path.stem, name or path.stem, (), "user", path, 0)


def touch_changed(path: Path, data: bytes) -> None:
    """Rewrite a clip so its (mtime, size) surely differ, as a real edit would."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


CHECKPOINT = VoiceInfo("default", "default", (), "checkpoint", None, None)


async def test_concurrent_requests_share_one_computation_off_the_loop(tmp_path: Path) -> None:
    engine = CountingEngine()
    cache = VoiceCache(engine, tmp_path / "cache", capacity=4)
    info = clip_voice(tmp_path / "a.wav", b"clip-a")
    voices = await asyncio.gather(*(cache.get(info) for _ in range(8)))
    assert len(engine.computed) == 1
    assert threading.get_ident() not in engine.compute_threads
    assert all(v.conditionals is voices[0].conditionals for v in voices)
    assert voices[0].key == f"counting-model:{hashlib.sha256(b'clip-a').hexdigest()}"
    assert voices[0].name == "a"


async def test_unchanged_clip_is_never_recomputed_not_even_after_restart(tmp_path: Path) -> None:
    engine = CountingEngine()
    info = clip_voice(tmp_path / "a.wav", b"clip-a")
    first = await VoiceCache(engine, tmp_path / "cache", 4).get(info)
    assert len(engine.computed) == 1 and engine.loaded == []
    restarted = VoiceCache(engine, tmp_path / "cache", 4)
    again = await restarted.get(info)
    assert len(engine.computed) == 1  # disk hit
    assert engine.loaded == [tmp_path / "cache" / model_dir_name("counting-model") / f"{first.key.split(':')[1]}.pt"]
    assert again.conditionals == first.conditionals and again.key == first.key
    await restarted.get(info)
    assert len(engine.loaded) == 1  # memory hit


async def test_changed_clip_is_recomputed(tmp_path: Path) -> None:
    engine = CountingEngine()
    cache = VoiceCache(engine, tmp_path / "cache", 4)
    info = clip_voice(tmp_path / "a.wav", b"version one")
    old = await cache.get(info)
    touch_changed(info.clip, b"version two!")
    new = await cache.get(info)
    assert len(engine.computed) == 2
    assert new.key != old.key
    assert new.conditionals["sha"] == hashlib.sha256(b"version two!").hexdigest()


async def test_same_content_under_two_names_is_computed_once(tmp_path: Path) -> None:
    engine = CountingEngine()
    cache = VoiceCache(engine, tmp_path / "cache", 4)
    a = await cache.get(clip_voice(tmp_path / "a.wav", b"same"))
    b = await cache.get(clip_voice(tmp_path / "b.wav", b"same"))
    assert len(engine.computed) == 1
    assert (a.name, b.name) == ("a", "b") and a.key == b.key


async def test_files_are_hashed_once_per_mtime_and_size(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    real = voice_cache_mod._hash_file
    monkeypatch.setattr(voice_cache_mod, "_hash_file", lambda p: calls.append(p) or real(p))
    cache = VoiceCache(CountingEngine(compute_s=0), tmp_path / "cache", 4)
    info = clip_voice(tmp_path / "a.wav", b"clip")
    for _ in range(5):
        await cache.get(info)
    assert calls == [info.clip]
    touch_changed(info.clip, b"clip2")
    await cache.get(info)
    assert len(calls) == 2


async def test_memory_is_bounded_lru_and_disk_backs_it(tmp_path: Path) -> None:
    engine = CountingEngine(compute_s=0)
    cache = VoiceCache(engine, tmp_path / "cache", capacity=2)
    infos = [clip_voice(tmp_path / f"{n}.wav", n.encode()) for n in "abc"]
    for info in infos:
        await cache.get(info)
    await cache.get(infos[1])  # b is now most recent; a was evicted by c
    assert engine.loaded == []
    await cache.get(infos[0])
    assert len(engine.computed) == 3 and len(engine.loaded) == 1  # a came back from disk


async def test_model_id_namespaces_the_cache(tmp_path: Path) -> None:
    info = clip_voice(tmp_path / "a.wav", b"clip")
    one, two = CountingEngine("model/one"), CountingEngine("model/two")
    v1 = await VoiceCache(one, tmp_path / "cache", 4).get(info)
    v2 = await VoiceCache(two, tmp_path / "cache", 4).get(info)
    assert len(one.computed) == len(two.computed) == 1 and v1.key != v2.key
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([model_dir_name("model/one"), model_dir_name("model/two")])


async def test_disk_writes_are_atomic_and_a_torn_file_is_recomputed(tmp_path: Path) -> None:
    engine = CountingEngine(compute_s=0)
    info = clip_voice(tmp_path / "a.wav", b"clip")
    voice = await VoiceCache(engine, tmp_path / "cache", 4).get(info)
    folder = tmp_path / "cache" / model_dir_name(engine.model_id)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{voice.key.split(':')[1]}.pt"]  # no temporary file left behind
    (folder / files[0]).write_text("{torn")
    again = await VoiceCache(engine, tmp_path / "cache", 4).get(info)
    assert len(engine.computed) == 2 and again.conditionals == voice.conditionals
    assert json.loads((folder / files[0]).read_text()) == voice.conditionals


async def test_checkpoint_voice_uses_builtin_conditionals(tmp_path: Path) -> None:
    engine = CountingEngine(builtin={"builtin": True})
    voice = await VoiceCache(engine, tmp_path / "cache", 4).get(CHECKPOINT)
    assert voice.key == "checkpoint:counting-model" and voice.conditionals == {"builtin": True}
    assert engine.computed == []


async def test_checkpoint_voice_without_builtin_conditionals_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(VoiceNotFoundError) as info:
        await VoiceCache(CountingEngine(builtin=None), tmp_path / "cache", 4).get(CHECKPOINT)
    assert info.value.param == "voice" and "default" in info.value.message


async def test_a_failed_computation_is_reported_and_retried_next_time(tmp_path: Path) -> None:
    engine = CountingEngine(compute_s=0)
    engine.fail_next = ValueError("not audio")
    cache = VoiceCache(engine, tmp_path / "cache", 4)
    info = clip_voice(tmp_path / "a.wav", b"clip")
    with pytest.raises(EngineError, match="not audio"):
        await cache.get(info)
    assert (await cache.get(info)).conditionals["sha"] == hashlib.sha256(b"clip").hexdigest()


async def test_an_unusable_clip_is_the_clients_error_not_a_server_fault(tmp_path: Path) -> None:
    engine = CountingEngine(compute_s=0)
    engine.fail_next = InvalidRequestError("Voice 'a' has no usable audio.", param="voice")
    info = clip_voice(tmp_path / "a.wav", b"clip")
    with pytest.raises(InvalidRequestError) as caught:
        await VoiceCache(engine, tmp_path / "cache", 4).get(info)
    assert caught.value.status_code == 400 and caught.value.param == "voice"


async def test_a_removed_clip_is_an_unknown_voice(tmp_path: Path) -> None:
    info = clip_voice(tmp_path / "a.wav", b"clip")
    info.clip.unlink()
    with pytest.raises(VoiceNotFoundError):
        await VoiceCache(CountingEngine(), tmp_path / "cache", 4).get(info)


async def test_a_cancelled_requester_does_not_cancel_the_shared_work(tmp_path: Path) -> None:
    engine = CountingEngine(compute_s=0.3)
    cache = VoiceCache(engine, tmp_path / "cache", 4)
    info = clip_voice(tmp_path / "a.wav", b"clip")
    impatient = asyncio.create_task(cache.get(info))
    patient = asyncio.create_task(cache.get(info))
    await asyncio.sleep(0.05)
    impatient.cancel()
    voice = await patient
    assert impatient.cancelled() and len(engine.computed) == 1 and voice.conditionals


async def test_with_the_fake_engine_and_the_shipped_voices(tmp_path: Path) -> None:
    engine = FakeEngine()
    library = VoiceLibrary(Path(__file__).resolve().parents[2] / "voices", tmp_path / "user")
    cache = VoiceCache(engine, tmp_path / "cache", 8)
    alloy, aria = await asyncio.gather(cache.get(library.get("alloy")), cache.get(library.get("aria")))
    assert engine.conditionals_computed == 1 and alloy.key == aria.key
    assert alloy.conditionals["digest"] == hashlib.sha256(library.get("aria").clip.read_bytes()).hexdigest()
    default = await cache.get(library.get("default"))
    assert default.key == f"checkpoint:{engine.model_id}"
    await VoiceCache(engine, tmp_path / "cache", 8).get(library.get("nova"))
    assert engine.conditionals_computed == 1  # restart: from disk


async def test_caches_sharing_a_directory_compute_a_voice_once(tmp_path: Path) -> None:
    """Two caches over one directory (two engine replicas on a shared volume): one computes,
    the other waits on the voice's lock file and loads the result."""
    info = clip_voice(tmp_path / "a.wav", b"clip")
    one, two = CountingEngine(compute_s=0.3), CountingEngine(compute_s=0.3)
    first, second = VoiceCache(one, tmp_path / "cache", 4), VoiceCache(two, tmp_path / "cache", 4)
    v1, v2 = await asyncio.gather(first.get(info), second.get(info))
    assert v1.conditionals == v2.conditionals
    assert len(one.computed) + len(two.computed) == 1
    assert first.disk_hits + second.disk_hits == 1
    folder = tmp_path / "cache" / model_dir_name("counting-model")
    assert sorted(p.name for p in folder.iterdir()) == [f"{v1.key.split(':')[1]}.pt"]  # the lock is gone


async def test_each_model_family_has_its_own_conditionals_for_one_clip(tmp_path: Path) -> None:
    engine = CountingEngine(compute_s=0.0, builtin={"builtin": True})
    cache = VoiceCache(engine, tmp_path / "cache", capacity=8)
    info = clip_voice(tmp_path / "a.wav", b"clip-a")
    original = await cache.get(info)
    turbo = await cache.get(info, "chatterbox-turbo")
    assert original.key != turbo.key
    assert (original.conditionals["model"], turbo.conditionals["model"]) == ("counting-model", "counting-model/chatterbox-turbo")
    assert len(engine.computed) == 2
    assert (await cache.get(info, "chatterbox-turbo")).conditionals is turbo.conditionals
    assert len(engine.computed) == 2
    # on disk too: a new cache (a restart) loads each family's own file
    again = VoiceCache(engine, tmp_path / "cache", capacity=8)
    assert (await again.get(info, "chatterbox-turbo")).conditionals == turbo.conditionals
    assert len(engine.computed) == 2 and cache.dir_for("chatterbox-turbo") != cache.dir_for()
    builtin = await cache.get(CHECKPOINT, "chatterbox-turbo")
    assert builtin.key == "checkpoint:counting-model/chatterbox-turbo"
