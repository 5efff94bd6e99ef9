"""The T3 prompt rows a voice contributes, computed once per voice and family.

A voice's rows (the original's Perceiver over its prompt speech tokens, Turbo's 375 prompt
speech rows) are the only CPU-heavy part of building a prompt. They depend on the voice
alone (no request parameter: the original's exaggeration is one row added per request), so
they are cached per voice key, computed on a worker thread (the event loop keeps serving),
and computed once however many requests wait for the same voice (single flight); the cache
is an LRU of ``size`` voices.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class VoiceRowsCache:
    def __init__(self, compute: Callable[[Any], Any], size: int) -> None:
        self._compute = compute
        """Blocking: a voice's conditionals -> its rows."""
        self._size = size
        self._rows: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> list[str]:
        return list(self._rows)

    def cached(self, key: str) -> Any | None:
        return self._rows.get(key)

    async def get(self, key: str, conditionals: Any) -> Any:
        rows = self._rows.get(key)
        if rows is not None:
            self._rows.move_to_end(key)
            return rows
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._compute, conditionals))
            self._pending[key] = pending
            pending.add_done_callback(lambda _f, k=key: self._pending.pop(k, None))
        rows = await asyncio.shield(pending)  # one waiter's cancellation spares the others
        self._rows[key] = rows
        self._rows.move_to_end(key)
        while len(self._rows) > self._size:
            self._rows.popitem(last=False)
        return rows
