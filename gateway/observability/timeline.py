"""One request's first-audio timeline: named moments from its arrival to its first byte sent.

A :class:`Timeline` is created by the request middleware only when the server runs with
``request_timeline`` and the request asks for it (``X-Timeline: 1``); every layer the request
passes through then marks what it finished, from whichever thread did it::

    trace = job.trace            # None for every other request: the cost is one ``is None``
    if trace is not None:
        trace.mark("t3 prompt built")

A mark is a monotonic timestamp appended to a list (``list.append`` is atomic under the GIL,
so the vocoder's worker thread and the event loop can both mark). Work timed on the GPU
(CUDA events) is marked with ``at=`` once its times are known. Nothing is ever read back from
a device for a timeline; the canonical log line carries :meth:`Timeline.as_json` and
``python -m gateway.tools.benchmark --stages timeline`` prints it as a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

HEADER = "x-timeline"
"""The request header that asks for a timeline (value ``1``)."""


@dataclass(slots=True)
class Timeline:
    origin: float = field(default_factory=time.perf_counter)
    """When the request arrived (``time.perf_counter`` seconds): every mark is relative to it."""
    marks: list[tuple[str, float]] = field(default_factory=list)
    limit: int = 256
    """Marks kept at most: a timeline stays bounded whatever a request does."""

    def mark(self, stage: str, at: float | None = None) -> None:
        """Record that ``stage`` ended now (or at ``at``, a ``time.perf_counter`` value)."""
        if len(self.marks) < self.limit:
            self.marks.append((stage, time.perf_counter() if at is None else at))

    def rows(self) -> list[tuple[str, float, float]]:
        """(stage, ms since arrival, ms since the previous mark), in time order."""
        out: list[tuple[str, float, float]] = []
        previous = self.origin
        for stage, at in sorted(self.marks, key=lambda m: m[1]):
            out.append((stage, (at - self.origin) * 1000, (at - previous) * 1000))
            previous = at
        return out

    def as_json(self) -> list[list[object]]:
        """``[[stage, ms since arrival], ...]`` in time order (for the log line)."""
        return [[stage, round(ms, 3)] for stage, ms, _ in self.rows()]


def wanted(headers: object) -> bool:
    """Whether ASGI ``headers`` (a list of (name, value) byte pairs) ask for a timeline."""
    for name, value in headers or ():  # type: ignore[attr-defined]
        if name == HEADER.encode() and value.strip() in (b"1", b"true", b"yes"):
            return True
    return False
