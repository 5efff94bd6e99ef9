"""Which voices exist and where their reference clips are: built-in, dropped-in, API-created.

Three sources, one namespace (ids, names and aliases, compared case-insensitively):

- **checkpoint / builtin**: ``<builtin_dir>/manifest.json`` lists the shipped voices, their
  clips (in the same folder) and their aliases; the voice without a clip is the model's own
  (``conds.pt`` of the checkpoint).
- **user, dropped in**: any audio file directly in ``user_dir`` (by extension) is a voice
  named after its file stem (sanitised). Read on every lookup, so a clip copied in while the
  server runs is usable at once.
- **user, created through the API** (:meth:`VoiceLibrary.create`): stored under
  ``<user_dir>/created/<id>/`` as ``clip.flac`` (24 kHz mono) and ``voice.json``. The folder
  is assembled under a temporary name and renamed into place, so a crash at any point leaves
  either no voice or a complete one.

On a name clash the earlier source wins: built-in, then API-created, then dropped-in files.

Owners: a voice created through the API with an API key belongs to that key (its id, see
``gateway.http.caller``, is stored in ``voice.json``, so ownership survives restarts and holds
in every process sharing the voices folder). Built-in and dropped-in voices, and voices
created on a server without keys, are shared. Every lookup takes a :class:`VoiceAccess`: a
key sees the shared voices and its own, and another key's voice does not exist for it (the
same 404 or 400 as a name nobody uses, so a key cannot learn what others named their voices;
names are unique per key and among shared voices, not across keys). An admin key, and every
caller on a server without keys, sees every voice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.voices.clip_files import CLIP_SAMPLE_RATE, atomic_write, decode_upload, fsync_dir, write_flac
from gateway.voices.clip_probe import DecodeLimits, DecoderTimeoutError
from gateway.voices.index import VoiceIndex
from gateway.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    VoiceNotFoundError,
)

VoiceSource = Literal["checkpoint", "builtin", "user"]

CLIP_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".mp4", ".aac", ".webm", ".aiff", ".aif"})
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Chatterbox reads the first 6 s of a clip for its speech-token prompt and the first 10 s
# for S3Gen's reference: 3 s is the least that still conditions usefully, anything past
# 10 s is ignored, and 30 s leaves room for an unedited recording.
DEFAULT_MIN_CLIP_S = 3.0
DEFAULT_MAX_CLIP_S = 30.0
DEFAULT_MAX_CLIP_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_CREATED = 1000
DEFAULT_MAX_CONSENT_CHARS = 1024
SHOWN_NAME_CHARS = 80
"""A voice name longer than this is cut in error messages (and never logged whole)."""
CREATED_DIR = "created"
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".deleting-"
_STALE_STAGING_S = 3600
# Peak below this (about -80 dBFS) is silence: nothing to learn a voice from.


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    aliases: tuple[str, ...]
    source: VoiceSource
    clip: Path | None
    created_at: int | None
    description: str = ""
    owner: str | None = None
    """The id of the API key that created it; None: shared (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class VoiceAccess:
    """Which voices a caller sees: the shared ones and those ``owner`` created, or, with
    ``everything``, all of them (an admin key; a server without keys)."""

    owner: str | None = None
    everything: bool = False

    def sees(self, voice: VoiceInfo) -> bool:
        return self.everything or voice.owner is None or voice.owner == self.owner

    def owns(self, voice: VoiceInfo) -> bool:
        return voice.owner is None or voice.owner == self.owner


EVERY_VOICE = VoiceAccess(everything=True)
"""A server without API keys: one namespace, every voice visible (tools and tests too)."""


@dataclass(frozen=True)
class _View:
    """One caller's voices: the listing (each id, name and alias once) and the lookup table."""

    voices: tuple[VoiceInfo, ...]
    by_key: dict[str, VoiceInfo]

    @classmethod
    def of(cls, everyone: list[VoiceInfo], access: VoiceAccess) -> _View:
        own: list[VoiceInfo] = []
        taken: set[str] = set()
        for voice in everyone:
            if access.owns(voice) and not _keys(voice) & taken:
                own.append(voice)
                taken |= _keys(voice)
        by_key = {key: voice for voice in reversed(own) for key in _keys(voice)}
        if not access.everything:
            return cls(tuple(own), by_key)
        # an admin also reaches other keys' voices: by id always, by name when neither a shared
        # voice nor its own has that name
        for voice in reversed(everyone):
            for key in _keys(voice):
                if key not in taken:
                    by_key[key] = voice
        shown = {id(v) for v in own}
        return cls(tuple(v for v in everyone if id(v) in shown or not access.owns(v)), by_key)


def sanitize_name(stem: str) -> str:
    """A file stem as a voice name: runs of characters outside [A-Za-z0-9_-] become "-"."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:64].strip("-")


class VoiceLibrary:
    """All voices, looked up by id, name or alias; create/delete for the voice API.

    ``create`` and ``delete`` block (FFmpeg, fsync): call them in a worker thread from async
    code. ``list`` and ``get`` only read a small directory. Each takes the caller's
    :class:`VoiceAccess`; left out, it is :data:`EVERY_VOICE` (a server without keys), so a
    route serving API keys must pass its caller's (``gateway.http.caller.Caller.voices``).
    """

    def __init__(
        self,
        builtin_dir: Path,
        user_dir: Path,
        *,
        max_clip_bytes: int = DEFAULT_MAX_CLIP_BYTES,
        min_clip_s: float = DEFAULT_MIN_CLIP_S,
        max_clip_s: float = DEFAULT_MAX_CLIP_S,
        max_created: int = DEFAULT_MAX_CREATED,
        max_consent_chars: int = DEFAULT_MAX_CONSENT_CHARS,
        decode_limits: DecodeLimits | None = None,
    ) -> None:
        self.builtin_dir = Path(builtin_dir).resolve()
        self.user_dir = Path(user_dir).resolve()
        self.max_clip_bytes = max_clip_bytes
        self.min_clip_s = min_clip_s
        self.max_clip_s = max_clip_s
        self.max_created = max_created
        self.max_consent_chars = max_consent_chars
        self.decode_limits = decode_limits or DecodeLimits()
        self._builtins = _load_manifest(self.builtin_dir)
        self._lock = threading.Lock()
        self._created_cache: dict[str, tuple[int, VoiceInfo]] = {}
        self._index = VoiceIndex(self._build_list, self.user_dir, self._created_dir)
        self._created_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()

    @property
    def _created_dir(self) -> Path:
        return self.user_dir / CREATED_DIR

    # ---- lookup ------------------------------------------------------------------------

    def list(self, access: VoiceAccess = EVERY_VOICE) -> list[VoiceInfo]:
        """The voices ``access`` sees, built-in first, each name/alias/id appearing once per
        owner (cached; rebuilt when the voices folders change, see :class:`VoiceIndex`)."""
        return list(self._view(access).voices)

    def _view(self, access: VoiceAccess) -> _View:
        return self._index.derived(access, lambda everyone: _View.of(everyone, access))

    def _build_list(self) -> list[VoiceInfo]:
        """Every voice of every owner, in precedence order; a voice whose id, name or alias an
        earlier voice of its owner's namespace (shared ones included) holds is shadowed."""
        voices = list(self._builtins)
        taken: dict[str | None, set[str]] = {None: {key for v in voices for key in _keys(v)}}
        for candidate in [*self._scan_created(), *self._scan_dropped()]:
            keys, owner = _keys(candidate), candidate.owner
            if keys & taken[None] or (owner is not None and keys & taken.get(owner, set())):
                continue  # shadowed by an earlier source (see module docstring)
            taken.setdefault(owner, set()).update(keys)
            voices.append(candidate)
        return voices

    def get(self, name_or_id: str, access: VoiceAccess = EVERY_VOICE) -> VoiceInfo:
        """The voice with this id, name or alias (case-insensitive) that ``access`` sees."""
        wanted = name_or_id.strip().lower()
        voice = self._view(access).by_key.get(wanted)
        if voice is not None:
            return voice
        raise VoiceNotFoundError(
            f"Voice '{_shown(name_or_id)}' does not exist. GET /v1/audio/voices lists the voices "
            "(and the OpenAI names that are aliases of them).",
            param="voice",
        )

    # ---- create / delete ---------------------------------------------------------------

    def create(
        self,
        name: str,
        clip_bytes: bytes,
        consent: str | None = None,
        *,
        access: VoiceAccess = EVERY_VOICE,
        deadline: float | None = None,
    ) -> VoiceInfo:
        """Validate an uploaded clip, store it as 24 kHz mono FLAC and return the new voice,
        owned by ``access.owner`` (None: shared). ``deadline`` (``time.monotonic()``): no
        decoder child runs past it, and a voice whose work ends past it is not created (504);
        the caller's answer can then still say so."""
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidRequestError(
                "Voice name must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'.", param="name"
            )
        if consent is not None and len(consent) > self.max_consent_chars:
            raise InvalidRequestError(
                f"consent is {len(consent)} characters; the limit is {self.max_consent_chars}.", param="consent"
            )
        if len(clip_bytes) > self.max_clip_bytes:
            raise PayloadTooLargeError(
                f"audio_sample is {len(clip_bytes)} bytes; the limit is {self.max_clip_bytes} bytes.",
                param="audio_sample",
            )
        if not clip_bytes:
            raise InvalidRequestError("audio_sample is empty.", param="audio_sample")
        # Cheap refusals before any decoding (checked again at the rename, under the lock).
        self._check_room_for(name, access)
        limits = self.decode_limits if deadline is None else dataclasses.replace(self.decode_limits, deadline=deadline)
        try:
            samples = decode_upload(clip_bytes, min_s=self.min_clip_s, max_s=self.max_clip_s, limits=limits)
        except InvalidRequestError:
            _check_deadline(deadline)  # cut by the request's limit, not refused for what it is
            raise
        voice_id = "voice_" + secrets.token_hex(12)
        created_at = int(time.time())
        meta = {"id": voice_id, "name": name, "created_at": created_at, "consent": consent,
                "duration_s": round(len(samples) / CLIP_SAMPLE_RATE, 3)}
        if access.owner is not None:
            meta["owner"] = access.owner
        # Assemble the voice in a private folder (slow: FFmpeg, fsync) without the lock; only
        # the name check and the rename that makes it visible need to be serialised.
        staging = self._created_dir / f"{_STAGING_PREFIX}{voice_id}"
        staging.mkdir(parents=True)
        try:
            _check_deadline(deadline)
            try:
                write_flac(samples, staging / "clip.flac", deadline=deadline)
            except DecoderTimeoutError:
                _check_deadline(deadline)  # the request's limit: a 504, nothing created
                raise
            atomic_write(staging / "voice.json", json.dumps(meta, indent=2).encode())
            fsync_dir(staging)
            with self._lock:
                _check_deadline(deadline)  # the last moment to give up: after this it exists
                self._check_room_for(name, access)
                os.replace(staging, self._created_dir / voice_id)
                fsync_dir(self._created_dir)
                self._index.invalidate()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return VoiceInfo(
            voice_id, name, (), "user", self._created_dir / voice_id / "clip.flac", created_at, owner=access.owner
        )

    def _check_room_for(self, name: str, access: VoiceAccess) -> None:
        # taken among the voices this caller sees: another key's names are not in its way
        if name.lower() in self._view(access).by_key:
            raise ConflictError(f"A voice named '{name}' already exists.", param="name")
        created = sum(1 for v in self._index.voices() if v.source == "user" and _is_created_id(v.id))
        if created >= self.max_created:
            raise InvalidRequestError(
                f"This server holds its limit of {self.max_created} created voices; delete one first.",
                param="name",
                code="too_many_voices",
            )

    def delete(self, name_or_id: str, access: VoiceAccess = EVERY_VOICE) -> VoiceInfo:
        """Remove a voice created through the API, found by id or name like :meth:`get`
        (case-insensitive, the same precedence, the same view); returns the voice removed. A
        shared voice created without a key may be deleted only by a caller that sees
        everything (an admin key; any caller on a server without keys)."""
        voice = self._view(access).by_key.get(name_or_id.strip().lower())
        if voice is None:
            raise NotFoundError(f"Voice '{_shown(name_or_id)}' does not exist.", param="voice_id")
        if voice.source != "user":
            raise InvalidRequestError(f"Voice '{_shown(name_or_id)}' is built in and cannot be deleted.", param="voice_id")
        if not _is_created_id(voice.id) or voice.clip is None or voice.clip.parent.parent != self._created_dir:
            raise InvalidRequestError(
                f"Voice '{_shown(name_or_id)}' is a file in the voices directory; remove the file to delete it.",
                param="voice_id",
            )
        if voice.owner is None and not access.everything:
            raise ForbiddenError(
                f"Voice '{_shown(name_or_id)}' was created without an API key and is shared: only an admin key "
                "(admin_api_keys) can delete it.",
                param="voice_id",
            )
        with self._lock:
            # Rename first: the voice disappears atomically even if removal is interrupted.
            trash = self._created_dir / f"{_TRASH_PREFIX}{voice.id}"
            try:
                os.replace(self._created_dir / voice.id, trash)
            except FileNotFoundError:
                raise NotFoundError(f"Voice '{_shown(name_or_id)}' does not exist.", param="voice_id") from None
            fsync_dir(self._created_dir)
            shutil.rmtree(trash, ignore_errors=True)
            self._created_cache.pop(voice.id, None)
            self._index.invalidate()
        return voice

    # ---- scanning ----------------------------------------------------------------------

    def _scan_created(self) -> list[VoiceInfo]:
        voices = []
        try:
            entries = sorted(os.scandir(self._created_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            if not _is_created_id(entry.name) or not entry.is_dir():
                continue
            info = self._read_created(Path(entry.path))
            if info is not None:
                voices.append(info)
        return sorted(voices, key=lambda v: (v.created_at or 0, v.id))

    def _read_created(self, folder: Path) -> VoiceInfo | None:
        meta_path, clip = folder / "voice.json", folder / "clip.flac"
        try:
            mtime = meta_path.stat().st_mtime_ns
            cached = self._created_cache.get(folder.name)
            if cached and cached[0] == mtime:
                return cached[1]
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not clip.is_file() or meta.get("id") != folder.name or not NAME_PATTERN.fullmatch(meta.get("name", "")):
                return None
        except (OSError, ValueError, AttributeError):
            return None  # incomplete or foreign folder: not a voice
        owner = meta.get("owner")
        info = VoiceInfo(
            folder.name, meta["name"], (), "user", clip, int(meta.get("created_at") or 0),
            owner=owner if isinstance(owner, str) and owner else None,
        )
        self._created_cache[folder.name] = (mtime, info)
        return info

    def _scan_dropped(self) -> list[VoiceInfo]:
        voices = []
        try:
            entries = sorted(os.scandir(self.user_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or path.suffix.lower() not in CLIP_EXTENSIONS or not entry.is_file():
                continue
            name = sanitize_name(path.stem)
            if not name:
                continue
            voices.append(VoiceInfo(name, name, (), "user", path, int(entry.stat().st_mtime)))
        return voices

    def _remove_stale_staging(self) -> None:
        # Left by a crash mid-create/delete. Only old ones: another process may be mid-create now.
        cutoff = time.time() - _STALE_STAGING_S
        for entry in os.scandir(self._created_dir):
            if entry.name.startswith((_STAGING_PREFIX, _TRASH_PREFIX)) and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestTimeoutError("The upload exceeded the request time limit; no voice was created.")


def _shown(name: str) -> str:
    return name if len(name) <= SHOWN_NAME_CHARS else f"{name[:SHOWN_NAME_CHARS]}… ({len(name)} characters)"


def _keys(voice: VoiceInfo) -> set[str]:
    return {voice.id.lower(), voice.name.lower(), *(a.lower() for a in voice.aliases)}


def _is_created_id(name: str) -> bool:
    return re.fullmatch(r"voice_[0-9a-f]{24}", name) is not None


def _load_manifest(builtin_dir: Path) -> list[VoiceInfo]:
    path = builtin_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"built-in voice manifest not found: {path}") from None
    voices = []
    seen: set[str] = set()
    for entry in manifest["voices"]:
        clip = entry.get("clip")
        info = VoiceInfo(
            id=entry["id"],
            name=entry.get("name", entry["id"]),
            aliases=tuple(entry.get("aliases", ())),
            source="builtin" if clip else "checkpoint",
            clip=(builtin_dir / clip) if clip else None,
            created_at=None,
            description=entry.get("description", ""),
        )
        if info.clip is not None and (Path(clip).name != clip or not info.clip.is_file()):
            raise ValueError(f"{path}: voice {info.id!r} names clip {clip!r}, which is not a file in {builtin_dir}")
        keys = _keys(info)
        if keys & seen:
            raise ValueError(f"{path}: voice {info.id!r} reuses a name or alias of another voice: {sorted(keys & seen)}")
        seen |= keys
        voices.append(info)
    return voices
