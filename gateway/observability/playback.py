"""A listener in real time: how long a client that plays a stream's audio as it arrives,
starting at the first audio, would have waited for more (a stall, heard as a gap).

First-audio figures say when a stream starts, throughput how much audio comes; neither says
whether it keeps coming in time. Under load a stream can start fast and then stop: its first
window's fraction of a second of audio plays out before the next window is made. The server
counts this per speech request (the log line's ``stall_ms``, the histogram
``chatterbox_stream_stall_seconds``), and the benchmarks count it from the client's side
(``gateway.tools.bench_http``)."""

from __future__ import annotations


class RealTimePlayer:
    """Feed it each piece of audio as it arrives (``arrive``); ``stalled_s`` is the total time
    the player had played everything that had come and waited for the next piece."""

    __slots__ = ("stalled_s", "until")

    def __init__(self) -> None:
        self.until: float | None = None
        """When the audio that has arrived is played out (None before the first piece)."""
        self.stalled_s = 0.0

    def arrive(self, at: float, audio_s: float) -> None:
        """``audio_s`` seconds of audio arrived at ``at`` (seconds on any one clock)."""
        if self.until is None:
            self.until = at
        elif at > self.until:
            self.stalled_s += at - self.until
            self.until = at
        self.until += audio_s
