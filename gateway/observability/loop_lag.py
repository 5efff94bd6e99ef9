"""How late the event loop runs what is due: every request's awaits wait that long.

One task sleeps ``interval_s`` again and again; how much later than asked it wakes is the
time anything ready to run on the loop waited behind other callbacks (and, with threads
decoding and vocoding beside it, for the GIL). Under load that lag adds to every stage of a
request that awaits: the first-audio timeline of 128 streams on an H100 (2026-12-05) showed
28 ms between a request's body and its next stage where one stream took 0.1 ms. The lag goes
to the histogram ``chatterbox_event_loop_lag_seconds``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float) -> None:
    """Until cancelled: sleep ``interval_s``, ``observe`` how many seconds late the wake-up was."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - asked))
