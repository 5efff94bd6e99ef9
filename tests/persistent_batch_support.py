"""vLLM's persistent batch as a logits processor's rows see it (slot i holds one request):
a removed request's hole filled by the last row (vLLM's condense), and swaps. Shared by the
tests of the device-resident penalty and of the fused sampling."""

from __future__ import annotations

from typing import Any


class PersistentBatch:
    def __init__(self, rows: Any) -> None:
        self.rows = rows
        """The processor's rows: ``remove(slot)`` and ``move(src, dst, swap=...)``."""
        self.slots: list[dict] = []

    def remove(self, slot: int) -> None:
        """Removed, then the last row moves into the hole (vLLM's condense)."""
        self.rows.remove(slot)
        last = len(self.slots) - 1
        if slot != last:
            self.slots[slot] = self.slots[last]
            self.rows.move(last, slot, swap=False)
        self.slots.pop()

    def swap(self, a: int, b: int) -> None:
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        self.rows.move(a, b, swap=True)
