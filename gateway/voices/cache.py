"""Voice conditionals, computed once per (clip content, model) and kept in memory and on disk.

Key: the SHA-256 of the clip's bytes and the weights of the model family
(``engine.weights_id(model)``): the families compute different conditionals from one clip. The file hash itself is
remembered per (path, mtime_ns, size), so a request for a known, unchanged clip costs one
``stat``. Lookup order: memory LRU -> ``<cache_dir>/<model>/<sha>.pt`` -> compute (in a
worker thread). Concurrent requests for the same uncomputed voice share one computation
(single flight); a requester that goes away does not cancel it for the others. Processes that
share the cache directory (engine replicas on one volume) compute a voice once too: a lock
file per voice, then the others load what the first wrote.

The model's own voice (source "checkpoint") comes from ``engine.builtin_conditionals()``
under the key ``checkpoint:<family weights>``; an engine without one makes that voice unknown
(VoiceNotFoundError), never silently another voice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from gateway.engine.base import Engine, Voice
from gateway.models.families import ORIGINAL
from gateway.errors import EngineError, GatewayError, VoiceNotFoundError
from gateway.voices.library import VoiceInfo

_HASH_BLOCK = 1 << 20


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def model_dir_name(model_id: str) -> str:
    """A folder name for a model id: readable, filesystem-safe, and distinct per id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._")[:80] or "model"
    return f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


class VoiceCache:
    def __init__(self, engine: Engine, cache_dir: Path, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.engine = engine
        self.capacity = capacity
        self.root = Path(cache_dir)
        self._memory: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._hashes: dict[Path, tuple[int, int, str]] = {}
        self._log = structlog.get_logger("gateway.voices.cache")
        self.computed = 0
        """Conditionals computed from clips (not loaded from disk) by this cache."""
        self.disk_hits = 0

    def dir_for(self, model: str = ORIGINAL) -> Path:
        """Where one family's conditionals live on disk."""
        return self.root / model_dir_name(self.engine.weights_id(model))

    async def get(self, info: VoiceInfo, model: str = ORIGINAL) -> Voice:
        """The voice's conditionals, computing them only if no cache has them."""
        if info.clip is None:
            key = f"checkpoint:{self.engine.weights_id(model)}"
            stat = None
        else:
            stat = _stat(info)
            key = f"{self.engine.weights_id(model)}:{await self._sha(info, stat)}"
        conditionals = self._memory.get(key)
        if conditionals is not None:
            self._memory.move_to_end(key)
            return Voice(name=info.name, key=key, conditionals=conditionals)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._produce(info, key, stat, model))
            self._inflight[key] = future
            future.add_done_callback(lambda f, k=key: self._settled(k, f))
        # shield: a cancelled requester (client hung up) must not cancel the shared work.
        conditionals = await asyncio.shield(future)
        return Voice(name=info.name, key=key, conditionals=conditionals)

    def _settled(self, key: str, future: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone; a later get() retries

    # ---- producing ---------------------------------------------------------------------

    async def _produce(self, info: VoiceInfo, key: str, stat: os.stat_result | None, model: str) -> Any:
        if info.clip is None:
            conditionals = await asyncio.to_thread(self.engine.builtin_conditionals, model)
            if conditionals is None:
                raise VoiceNotFoundError(
                    f"Voice '{info.name}' is the checkpoint's own voice, and the loaded model "
                    f"({self.engine.weights_id(model)}) has none.",
                    param="voice",
                )
            self._remember(key, conditionals)
            return conditionals

        path = self.dir_for(model) / f"{key.rsplit(':', 1)[1]}.pt"
        conditionals, cacheable = await asyncio.to_thread(self._load_or_compute, info, path, stat, model)
        if cacheable:
            self._remember(key, conditionals)
        return conditionals

    def _load_or_compute(self, info: VoiceInfo, path: Path, stat: os.stat_result | None, model: str) -> tuple[Any, bool]:
        """From disk, or computed and saved; blocking. Processes sharing the cache directory
        (engine replicas on a shared volume) compute each voice once: the first takes the
        voice's lock file and computes, the others wait on it and then load the file."""
        conditionals = self._load(path, model)
        if conditionals is None:
            with _exclusive(path.with_name(f".{path.name}.lock"), self._log):
                conditionals = self._load(path, model)
                if conditionals is None:
                    conditionals = self._compute(info, model)
                    if not _unchanged(info.clip, stat):
                        # The clip changed while we worked: these conditionals belong to neither
                        # version's hash. Serve this request, cache nothing.
                        return conditionals, False
                    self._save(conditionals, path)
                    return conditionals, True
        self.disk_hits += 1
        return conditionals, True

    def _compute(self, info: VoiceInfo, model: str) -> Any:
        assert info.clip is not None
        try:
            conditionals = self.engine.compute_conditionals(info.clip, model)
        except FileNotFoundError:
            raise _gone(info) from None
        except GatewayError:
            raise  # e.g. a dropped-in clip that is not usable audio: a 400 naming the voice
        except Exception as exc:
            raise EngineError(
                f"Could not compute conditionals for voice '{info.name}': {type(exc).__name__}: {exc}"
            ) from exc
        self.computed += 1
        return conditionals

    def _remember(self, key: str, conditionals: Any) -> None:
        self._memory[key] = conditionals
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def _load(self, path: Path, model: str) -> Any | None:
        if not path.is_file():
            return None
        try:
            return self.engine.load_conditionals(path, model)
        except Exception as exc:  # a torn or foreign file: recompute and overwrite it
            self._log.warning("voice_cache_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
            path.unlink(missing_ok=True)
            return None

    def _save(self, conditionals: Any, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.engine.save_conditionals(conditionals, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            # A full or read-only disk costs a recomputation after restart, nothing more.
            self._log.warning("voice_cache_write_failed", path=str(path), error=f"{type(exc).__name__}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)

    # ---- hashing -----------------------------------------------------------------------

    async def _sha(self, info: VoiceInfo, stat: os.stat_result) -> str:
        clip = info.clip
        assert clip is not None
        known = self._hashes.get(clip)
        if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size):
            return known[2]
        try:
            sha = await asyncio.to_thread(_hash_file, clip)
        except FileNotFoundError:
            raise _gone(info) from None
        if _unchanged(clip, stat):  # only remember a hash we know matches that (mtime, size)
            self._hashes[clip] = (stat.st_mtime_ns, stat.st_size, sha)
        return sha


@contextlib.contextmanager
def _exclusive(lock_path: Path, log: Any) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (NFSv4 and EFS honour it across hosts),
    removed on the way out. Where the directory cannot hold a lock file or the filesystem has
    no locks, go on without: the atomic rename keeps the files whole, a voice may then be
    computed twice. (A waiter left holding a removed file's lock only re-reads the finished
    file; two may compute only after the holder failed to.)"""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.warning("voice_cache_lock_unavailable", path=str(lock_path), error=f"{type(exc).__name__}: {exc}")
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("voice_cache_lock_unavailable", path=str(lock_path), error=f"{type(exc).__name__}: {exc}")
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)  # releases the lock


def _stat(info: VoiceInfo) -> os.stat_result:
    assert info.clip is not None
    try:
        return info.clip.stat()
    except FileNotFoundError:
        raise _gone(info) from None


def _gone(info: VoiceInfo) -> VoiceNotFoundError:
    return VoiceNotFoundError(f"Voice '{info.name}' no longer exists (its clip was removed).", param="voice")


def _unchanged(clip: Path, stat: os.stat_result | None) -> bool:
    try:
        now = clip.stat()
    except OSError:
        return False
    return stat is not None and (now.st_mtime_ns, now.st_size) == (stat.st_mtime_ns, stat.st_size)
