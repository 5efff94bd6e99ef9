"""GET /health on a new connection every 100 ms, in a process of its own.

An attack runs hundreds of sockets in the tool's own interpreter: a prober thread there
would wait for that interpreter's lock between its system calls and measure the attacker's
load as much as the server's. A separate process (started with ``spawn``: no state copied
from a busy parent) measures only what a load balancer's health check would see.
"""

from __future__ import annotations

import collections
import multiprocessing
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

PROBE_INTERVAL_S = 0.1


@dataclass
class ProbeResults:
    latencies_ms: list[float] = field(default_factory=list)
    failure_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.failure_kinds.values())


def probe_once(address: tuple[str, int]) -> float:
    """Milliseconds for one ``GET /health`` on a new connection, to the server's close;
    OSError when it fails or is not a 200."""
    started = time.perf_counter()
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise OSError(answer[:12].decode("latin-1") or "closed unanswered")
    return (time.perf_counter() - started) * 1000


def _probe_until_stopped(address: tuple[str, int], stop: Any, results: Connection) -> None:
    found = ProbeResults()
    kinds: collections.Counter[str] = collections.Counter()
    results.send("ready")
    while not stop.wait(PROBE_INTERVAL_S):
        try:
            found.latencies_ms.append(probe_once(address))
        except OSError as exc:
            kinds[type(exc).__name__ if type(exc) is not OSError else str(exc)] += 1
    found.failure_kinds = dict(kinds)
    results.send(found)
    results.close()


class Prober:
    """Start it, run the attack, then :meth:`finish` for what it saw."""

    def __init__(self, host: str, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe_until_stopped, args=((host, port), self._stop, sender), daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the prober process and wait until it runs (an attack begun before would be
        partly unobserved: a new interpreter starts slowly on a busy machine)."""
        self._process.start()
        if self._results.poll(timeout_s):
            self._results.recv()

    def finish(self, timeout_s: float = 10.0) -> ProbeResults:
        self._stop.set()
        found = self._results.recv() if self._results.poll(timeout_s) else ProbeResults({}, {"no report": 1})  # type: ignore[arg-type]
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
        return found  # type: ignore[no-any-return]
