"""The voice list, kept between requests and rebuilt only when a voices folder changes.

Every speech request looks its voice up; scanning the voices folders each time costs
milliseconds once there are hundreds of voices. A voice dropped in, created or deleted
changes the modification time of the folder holding it, so the index keeps the list
together with the two folders' ``st_mtime_ns`` and rebuilds it when either differs. A stamp
taken less than :data:`RACY_S` after the folder changed is not trusted (a change within the
file system's timestamp granularity would look like no change): the next lookup rebuilds.
What callers derive from the list (each API key's view of it) is kept with it, computed once
per list and key (:meth:`VoiceIndex.derived`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

RACY_S = 1.0


VoiceInfo = TypeVar("VoiceInfo")
D = TypeVar("D")


class VoiceIndex(Generic[VoiceInfo]):
    def __init__(self, build: Callable[[], list[VoiceInfo]], *folders: Path) -> None:
        self._build = build
        self._folders = folders
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._voices: list[VoiceInfo] = []
        self._derived: dict[Hashable, tuple[list[VoiceInfo], Any]] = {}
        self.builds = 0

    def voices(self) -> list[VoiceInfo]:
        self._refresh()
        return list(self._voices)

    def derived(self, key: Hashable, make: Callable[[list[VoiceInfo]], D]) -> D:
        """``make(voices)`` for the current list, computed once per list and ``key``."""
        self._refresh()
        with self._lock:
            voices = self._voices
            cached = self._derived.get(key)
            if cached is None or cached[0] is not voices:
                cached = self._derived[key] = (voices, make(voices))
            return cached[1]  # type: ignore[no-any-return]

    def invalidate(self) -> None:
        with self._lock:
            self._stamp = None

    def _refresh(self) -> None:
        stamp = self._stamps()
        if stamp is not None and stamp == self._stamp:
            return
        with self._lock:
            voices = self._build()
            racy = stamp is None or any(time.time_ns() - ns < RACY_S * 1e9 for ns in stamp)
            self._voices = voices
            self._derived.clear()
            self._stamp = None if racy else stamp
            self.builds += 1

    def _stamps(self) -> tuple[int, ...] | None:
        try:
            return tuple(os.stat(folder).st_mtime_ns for folder in self._folders)
        except OSError:
            return None
