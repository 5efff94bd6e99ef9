"""The voice list, kept between requests and rebuilt only when a voices folder changes.

Every speech request looks its voice up; scanning the voices folders each time costs
milliseconds once there are hundreds of voices. A voice dropped in, created or deleted
changes the modification time of the folder holding it, so the index keeps the list
together with the two folders' ``st_mtime_ns`` and rebuilds it when either differs. A stamp
taken less than :data:`RACY_S` after the folder changed is not trusted (a change within the
file system's timestamp granularity would look like no change): the next lookup rebuilds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

RACY_S = 1.0


class _Named(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...


VoiceInfo = TypeVar("VoiceInfo", bound=_Named)


class VoiceIndex(Generic[VoiceInfo]):
    def __init__(self, build: Callable[[], list[VoiceInfo]], *folders: Path) -> None:
        self._build = build
        self._folders = folders
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._voices: list[VoiceInfo] = []
        self._by_key: dict[str, VoiceInfo] = {}
        self.builds = 0

    def voices(self) -> list[VoiceInfo]:
        self._refresh()
        return list(self._voices)

    def by_key(self) -> dict[str, VoiceInfo]:
        """Every id, name and alias (lower case) -> its voice."""
        self._refresh()
        return self._by_key

    def invalidate(self) -> None:
        with self._lock:
            self._stamp = None

    def _refresh(self) -> None:
        stamp = self._stamps()
        if stamp is not None and stamp == self._stamp:
            return
        with self._lock:
            voices = self._build()
            by_key: dict[str, VoiceInfo] = {}
            for voice in voices:
                for key in (voice.id, voice.name, *voice.aliases):
                    by_key.setdefault(key.lower(), voice)
            racy = stamp is None or any(time.time_ns() - ns < RACY_S * 1e9 for ns in stamp)
            self._voices, self._by_key = voices, by_key
            self._stamp = None if racy else stamp
            self.builds += 1

    def _stamps(self) -> tuple[int, ...] | None:
        try:
            return tuple(os.stat(folder).st_mtime_ns for folder in self._folders)
        except OSError:
            return None
