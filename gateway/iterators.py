"""Closing async iterators the same way everywhere.

A request's work lives in async generators (the engine's audio, the encoder's bytes); closing
one is how its work is cancelled. ``aclose()`` on a generator that another frame is still
running raises ``RuntimeError``: that frame is already unwinding it, so there is nothing
left for us to do, and the error is dropped. Any other error propagates.
"""

from __future__ import annotations

import contextlib


async def aclose_quietly(iterator: object) -> None:
    """``await iterator.aclose()`` if it has one; a generator already closing elsewhere is left be."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):
            await aclose()
