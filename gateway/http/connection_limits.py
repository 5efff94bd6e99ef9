"""The bounds one server puts on its connections, and the state its connections share.

Read from the settings once per server (:meth:`ConnectionLimits.from_settings`); the guarded
protocol (:mod:`gateway.http.connection_guard`) applies them to every connection and keeps
here what they share: who is waiting (the eviction order), the bytes of unfinished bodies
(the budget) and the counts the warnings and the metrics report. Also the file-descriptor
limit the connection cap is kept under, and the filter that rate-limits asyncio's "accept()
out of system resource" line.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.server.memory import HeapTrimmer
from gateway.server.shutdown import ShutdownClock
from gateway.settings import Settings

# Descriptors kept free for what is not a client socket: log files, the voices directory,
# three pipes per FFmpeg child, the engine's own files.
FD_RESERVE_BASE = 64
FD_RESERVE_PER_REQUEST = 4
MAX_HELD_EVICTED = 256
"""Evicted connections held open at most (beyond the cap, while descriptors allow)."""
ACCEPT_BATCHES_IN_TRANSIT = 3
"""Accept batches whose descriptors can be open beyond the cap at once. asyncio accepts a
batch in one turn of its loop, makes each connection's protocol a turn later and calls its
``connection_made`` (where the cap evicts an older connection) the turn after; the evicted
socket is closed one turn after that. Meanwhile the listening socket is read every turn, so
three batches are open beyond the cap when the next is accepted (measured with 128
descriptors and 8 connecting threads: batches of 32 reached the limit, and asyncio stopped
accepting for a second, five times in 3 s; batches of 16 peaked at 95 descriptors)."""

_log = logging.getLogger("gateway.http.connections")


def descriptor_limit() -> int:
    """The process's soft limit on open files (RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (what a process may do for itself); the
    new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # a container may forbid it: the connection cap follows the limit we have
    return soft


@dataclass
class ConnectionLimits:
    """One server's bounds and the state its connections share (all on its event loop)."""

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    shutdown_clock: ShutdownClock
    max_header_bytes: int = 16_384
    body_min_rate: float = 0.0
    body_rate_grace_s: float = 5.0
    max_pending_body_bytes: int = 64 * 1_048_576
    max_body_bytes: int = 128 * 1024
    """Largest body of a request to a path not in ``body_caps``."""
    body_caps: dict[str, int] = field(default_factory=dict)
    """Largest body per request path (e.g. uploads)."""
    heap: HeapTrimmer = field(default_factory=HeapTrimmer)
    waiting_headers: dict[Any, float] = field(default_factory=dict)
    """Connections waiting for request headers, longest waiting first, with when they began."""
    waiting_bodies: dict[Any, float] = field(default_factory=dict)
    """Connections waiting for the rest of a request body, longest waiting first."""
    handshakes: dict[Any, float] = field(default_factory=dict)
    """TLS connections whose handshake has not ended (:mod:`gateway.http.tls`), longest waiting
    first, with when they were accepted: they count toward ``max_connections`` before uvicorn
    knows of them, and are evicted like connections waiting for their headers."""
    accept_batch: int = 256
    """Connections accepted in one go (asyncio accepts up to the listen backlog per turn of
    the loop, each a descriptor before any eviction frees one: past the descriptor limit
    asyncio stops accepting for a second): ``listen_backlog``, or where descriptors are few
    what lets :data:`ACCEPT_BATCHES_IN_TRANSIT` batches fit in half the reserve and half the
    spare descriptors. The kernel's listen queue stays ``listen_backlog``
    (``gateway.server.http_server.GatewayServer``)."""
    max_held_evicted: int = 0
    """Evicted connections held silent before they close, outside the cap (the descriptors to
    spare beyond it, at most :data:`MAX_HELD_EVICTED`; see ``GuardedH11Protocol._evict``)."""
    held_evicted: dict[Any, None] = field(default_factory=dict)
    lingering: dict[Any, None] = field(default_factory=dict)
    """Connections answered before their body came, dropping the rest (evicted first)."""
    pending_body_bytes: int = 0
    """Bytes received of request bodies not yet complete, all connections together."""
    refused: int = 0
    evicted: int = 0
    timed_out: int = 0
    over_budget: int = 0
    _last_warning: float = 0.0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        shutdown_clock: ShutdownClock,
        fd_limit: int | None = None,
        body_caps: dict[str, int] | None = None,
    ) -> ConnectionLimits:
        fds = descriptor_limit() if fd_limit is None else fd_limit
        room = fds - FD_RESERVE_BASE - FD_RESERVE_PER_REQUEST * settings.max_in_flight
        max_connections = max(1, min(settings.max_connections, room))
        spare = max(0, room - max_connections)  # descriptors beyond the cap, shared by the two below
        return cls(
            max_connections=max_connections,
            max_held_evicted=min(MAX_HELD_EVICTED, spare // 2),
            accept_batch=min(settings.listen_backlog, max(1, (FD_RESERVE_BASE // 2 + spare // 2) // ACCEPT_BATCHES_IN_TRANSIT)),
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            shutdown_clock=shutdown_clock,
            max_header_bytes=settings.max_header_bytes,
            body_min_rate=float(settings.body_min_rate_bytes_s),
            body_rate_grace_s=settings.body_rate_grace_s,
            max_pending_body_bytes=settings.max_pending_body_bytes,
            max_body_bytes=settings.max_body_bytes,
            body_caps=dict(body_caps or {}),
        )

    def body_cap(self, path: str) -> int:
        return self.body_caps.get(path, self.max_body_bytes)

    def stats(self) -> dict[str, tuple[str, str, float]]:
        """``{name: (kind, help, value)}`` for the metrics scrape (kind: gauge or counter)."""
        return {
            "connections_waiting": (
                "gauge", "Connections waiting for request headers, a body or a TLS handshake.",
                len(self.waiting_headers) + len(self.waiting_bodies) + len(self.handshakes),
            ),
            "connections_lingering": ("gauge", "Connections answered early, dropping the rest of their body.", len(self.lingering)),
            "connections_held_evicted": ("gauge", "Evicted connections held silent before they close.", len(self.held_evicted)),
            "pending_body_bytes": ("gauge", "Bytes of unfinished request bodies held.", self.pending_body_bytes),
            "connections_refused": ("counter", "Connections refused at the cap (all busy).", self.refused),
            "connections_evicted": ("counter", "Waiting connections closed to make room at the cap.", self.evicted),
            "connections_timed_out": ("counter", "Requests cut for headers or a body too slow (408).", self.timed_out),
            "request_bodies_over_budget": ("counter", "Bodies refused past max_pending_body_bytes (503).", self.over_budget),
        }

    def hold(self, size: int) -> None:
        self.pending_body_bytes += size
        self.heap.note_received(size)

    def release(self, size: int) -> None:
        self.pending_body_bytes -= size
        self.heap.note_released(self.pending_body_bytes)

    def warn(self, event: str, **fields: Any) -> None:
        """At most one warning a second: a flood of refusals must not become a log flood."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            _log.warning(
                "%s (max_connections=%d, refused=%d, evicted=%d, timed_out=%d, over_budget=%d, "
                "pending_body_bytes=%d) %s",
                event, self.max_connections, self.refused, self.evicted, self.timed_out, self.over_budget,
                self.pending_body_bytes, " ".join(f"{k}={v}" for k, v in fields.items()),
            )


class AcceptErrorFilter(logging.Filter):
    """Let through one asyncio "accept() out of system resource" line a second, counting the
    rest: past the descriptor limit asyncio logs one per attempt, thousands a second."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.suppressed = 0
        self._last = -float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if "out of system resource" not in record.getMessage():
            return True
        now = self.clock()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        self._last = now
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} more suppressed)"
            self.suppressed = 0
        return True
