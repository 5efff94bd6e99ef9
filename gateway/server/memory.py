"""Give the heap back to the operating system after a burst of request bodies.

Request bodies are many mid-sized allocations (uvicorn's body buffer, the app's copy). glibc
keeps freed heap memory for reuse, and raises its mmap threshold after freeing a large block,
so after a thousand unfinished bodies are dropped the process keeps most of their peak
resident (measured: 775 of 990 MiB, issue 20). ``malloc_trim(0)`` returns every free page.

:class:`HeapTrimmer` watches request bodies: once ``threshold_bytes`` of them have been
received since the last trim (held, or read and refused) and the bytes of unfinished bodies
fall back to ``low_bytes``, it trims once, in a worker thread, ``delay_s`` later (a burst
usually ends in a wave of closes), and at most every ``min_interval_s``. Elsewhere than glibc
it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable

_log = logging.getLogger("gateway.server.memory")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def trim_heap() -> bool:
    """Return free heap pages to the OS now; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrimmer:
    def __init__(
        self,
        *,
        threshold_bytes: int = 16 * 1_048_576,
        low_bytes: int = 1_048_576,
        delay_s: float = 1.0,
        min_interval_s: float = 10.0,
    ) -> None:
        self.threshold_bytes = threshold_bytes
        self.low_bytes = low_bytes
        self.delay_s = delay_s
        self.min_interval_s = min_interval_s
        self.trims = 0
        self._received = 0
        self._scheduled = False
        self._last = -float("inf")

    def note_received(self, size: int) -> None:
        self._received += size

    def note_released(self, pending: int) -> None:
        if self._received < self.threshold_bytes or self._scheduled or pending > self.low_bytes:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled = True
        wait_s = max(self.delay_s, self._last + self.min_interval_s - time.monotonic())
        loop.call_later(wait_s, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._received = 0
        self._last = time.monotonic()
        self.trims += 1
        # malloc_trim walks the whole heap: off the event loop
        loop.run_in_executor(None, trim_heap)
