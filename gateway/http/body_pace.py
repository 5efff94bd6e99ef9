"""How long a request body may take: a total deadline and a minimum average rate.

A body is judged on the time the server was willing to read it. uvicorn stops reading a
connection when the app has not taken the last 64 KiB yet (an upload waiting for its slot,
say); that time is the server's, not the client's, so :class:`ReadPauseClock` (uvicorn's flow
control, timed) measures it and :class:`BodyPace` leaves it out. On the rest:

- the whole body must be in within ``timeout_s``;
- after ``grace_s``, at least ``min_rate`` bytes per second on average must have come:
  ``received >= min_rate * (elapsed - grace_s)``. A client that sends one byte every few
  seconds is cut at ``grace_s``; a real upload, even over a slow link, stays far above it
  (``min_rate`` 0 turns the rate off).

The protocol asks :meth:`BodyPace.verdict` on a timer: it says why the body failed, or how
long until the bytes received so far stop being enough (the next time to look), so a healthy
body costs one timer per few seconds, not one per chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.protocols.http.flow_control import FlowControl


class ReadPauseClock(FlowControl):
    """uvicorn's flow control, also adding up how long reading was paused by the server."""

    def __init__(self, transport: asyncio.Transport, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(transport)
        self._clock = clock
        self._paused_since: float | None = None
        self._paused_total = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_since = self._clock()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self._paused_since is not None:
            self._paused_total += self._clock() - self._paused_since
            self._paused_since = None
        super().resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def paused_s(self, now: float) -> float:
        """Seconds reading has been paused since this connection started, up to ``now``."""
        current = now - self._paused_since if self._paused_since is not None else 0.0
        return self._paused_total + current


@dataclass(slots=True)
class BodyPace:
    timeout_s: float
    min_rate: float
    """Bytes per second (0: no rate)."""
    grace_s: float
    started: float
    """When the headers ended (or the client was told to go on, after ``Expect: 100-continue``)."""
    paused_at_start: float
    """``ReadPauseClock.paused_s`` at ``started``."""
    received: int = 0

    def restart(self, now: float, paused_s: float) -> None:
        """Start the clock again (the client was waiting for us, e.g. for ``100 Continue``)."""
        self.started, self.paused_at_start, self.received = now, paused_s, 0

    def verdict(self, now: float, paused_s: float, *, paused: bool) -> tuple[str | None, float]:
        """``(why the body failed, 0)`` or ``(None, seconds until the next look)``."""
        if paused:
            return None, self.grace_s  # the server is not reading: nothing to judge
        reading_s = now - self.started - (paused_s - self.paused_at_start)
        if reading_s >= self.timeout_s:
            return f"the request body did not arrive within {self.timeout_s:g} s", 0.0
        allowed_s = self.timeout_s
        if self.min_rate > 0:
            allowed_s = min(allowed_s, self.grace_s + self.received / self.min_rate)
            if reading_s > allowed_s:
                return (
                    f"the request body arrived slower than {self.min_rate:g} bytes/s "
                    f"({self.received} bytes in {reading_s:.1f} s)",
                    0.0,
                )
        # a small step past the point where the bytes stop being enough, so the next look
        # finds either more bytes or a verdict
        return None, allowed_s - reading_s + 0.01
