"""Test signals for the encoder tests: a tone, fed in chunks as an engine would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

SR = 24_000


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def chunked(audio: np.ndarray, size: int = 2400) -> AsyncIterator[np.ndarray]:
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([b async for b in it])


async def endless(closed: asyncio.Event | None = None, pause_s: float = 0.0) -> AsyncIterator[np.ndarray]:
    """A stream that never ends on its own; sets ``closed`` once it is closed."""
    try:
        while True:
            yield tone(0.1)
            await asyncio.sleep(pause_s)
    finally:
        if closed is not None:
            closed.set()
