"""Closing the samples iterator an encoder route was given, whichever way the route ends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import numpy as np


async def close_iterator(chunks: AsyncIterator[np.ndarray]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # already running/closed elsewhere
            await aclose()
