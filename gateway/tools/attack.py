"""A short adversarial run: each attack of issue 8 in turn against a gateway on this machine,
while a prober asks ``GET /health`` on a fresh connection every 100 ms.

    python -m gateway.tools.attack --url http://127.0.0.1:8000 [--duration 10] \
        [--server-pid PID] [--api-key KEY] [--json out.json]

Attacks (each for ``--duration`` seconds, then a settle pause):

- ``baseline``: nothing, for comparison;
- ``stalled-readers``: long wav requests at speed 0.25 from sockets with a 1 KiB receive
  buffer that never read (kept at ``--stalled`` open);
- ``stalled-resend``: the same stalled readers, all from one client address (127.0.0.2),
  each re-sent as soon as the server drops it (issue 20: a few of them kept most slots busy),
  while ``--others`` other clients (127.0.0.3, 127.0.0.4, ...) each ask for a short sentence
  a second and read it; reported: how many of theirs were served and how many refused;
- ``upload-bombs``: 4,140-byte WAVs declaring 1 Hz, and 512 channels, posted as voices;
- ``slow-headers``: connections sending their headers a byte a second;
- ``slow-bodies``: speech requests whose body comes a byte a second;
- ``idle-flood``: ``--idle`` connections that send nothing;
- ``pathological-text``: speech requests of 4095 spaces and a letter, 16 at a time;
- ``request-flood``: the same flood with "Hello there." (the control: what 16 clients
  hammering the server cost whatever their text).

Reported per attack: /health probes, failures, p50/p95/max latency, and afterwards what the
server still holds (in flight, queued, FFmpeg children with ``--server-pid``). Exit status
1 when a probe failed or p95 exceeded ``--budget-ms`` (50) under any attack.

Bounded on purpose: loopback targets only, at most 60 s per attack and 2000 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from gateway.tools.loadtest import NotLoopbackError, _bounded, _scrape, ffmpeg_children, require_loopback

MAX_DURATION_S = 60.0
MAX_CONNECTIONS = 2000
PROBE_INTERVAL_S = 0.1
ATTACKER_ADDRESS = "127.0.0.2"
"""Where ``stalled-resend`` connects from: one client, apart from the others (127.0.0.3, ...)."""
LONG_TEXT = ("A sentence that goes on and on for the listener who never listens. " * 61)[:4096]


def bomb_wav(*, sample_rate: int, channels: int) -> bytes:
    samples = b"\x10\x20" * 2048
    block = 2 * channels
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(samples)) + samples


def _request(method: str, path: str, body: bytes, content_type: str, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: gateway\r\n{auth}Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Prober(threading.Thread):
    """GET /health on a new connection every 100 ms, in its own thread with blocking sockets
    (so the attack's own event loop cannot delay it)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.address = (host, port)
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(PROBE_INTERVAL_S):
            started = time.perf_counter()
            try:
                with socket.create_connection(self.address, timeout=5) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise OSError(answer[:40])
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
            except OSError:
                self.failures += 1


class Attack:
    def __init__(self, host: str, port: int, args: argparse.Namespace) -> None:
        self.host, self.port, self.args = host, port, args
        self.sockets: list[socket.socket] = []
        self.others: dict[str, int] = {}
        """Outcomes of the other clients' requests (``stalled-resend``): ok, a status, failed."""

    def connect(self, *, rcvbuf: int | None = None, source: str | None = None) -> socket.socket | None:
        if len(self.sockets) >= MAX_CONNECTIONS:
            return None
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            sock.bind((source, 0))  # another loopback address: another client to the server
        sock.setblocking(False)
        try:
            sock.connect((self.host, self.port))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return None
        self.sockets.append(sock)
        return sock

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    async def send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), timeout=5)
            return True
        except (OSError, asyncio.TimeoutError):
            return False

    async def baseline(self, until: float) -> None:
        await asyncio.sleep(max(0.0, until - time.monotonic()))

    async def stalled_readers(self, until: float, source: str | None = None) -> None:
        body = json.dumps(
            {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "wav", "speed": 0.25}
        ).encode()
        request = _request("POST", "/v1/audio/speech", body, "application/json", self.args.api_key)
        open_now: list[socket.socket] = []
        while time.monotonic() < until:
            open_now = [s for s in open_now if _alive(s)]
            while len(open_now) < self.args.stalled:
                sock = self.connect(rcvbuf=1024, source=source)
                if sock is None or not await self.send(sock, request):
                    break
                open_now.append(sock)
            await asyncio.sleep(0.1)  # re-send a dropped one at once

    async def stalled_resend(self, until: float) -> None:
        others = [self._polite(until, f"127.0.0.{3 + i}") for i in range(self.args.others)]
        await asyncio.gather(self.stalled_readers(until, source=ATTACKER_ADDRESS), *others)

    async def _polite(self, until: float, source: str) -> None:
        """One well-behaved client: a short sentence, read to its end, about once a second."""
        body = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", "response_format": "pcm"}
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        transport = httpx.AsyncHTTPTransport(local_address=source)
        async with httpx.AsyncClient(base_url=self.args.url, timeout=30, headers=headers, transport=transport) as client:
            await asyncio.sleep(0.5)  # the stalled readers first, as in the issue
            while time.monotonic() < until:
                started = time.monotonic()
                try:
                    response = await client.post("/v1/audio/speech", json=body)
                    outcome = "ok" if response.status_code == 200 and response.content else str(response.status_code)
                except httpx.HTTPError:
                    outcome = "failed"
                self.others[outcome] = self.others.get(outcome, 0) + 1
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    async def upload_bombs(self, until: float) -> None:
        bombs = [bomb_wav(sample_rate=1, channels=1), bomb_wav(sample_rate=24000, channels=512)]
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}

        async def loop(i: int) -> None:
            async with httpx.AsyncClient(base_url=self.args.url, timeout=30, headers=headers) as client:
                n = 0
                while time.monotonic() < until:
                    files = {"audio_sample": ("bomb.wav", bombs[n % 2], "audio/wav")}
                    await client.post("/v1/audio/voices", data={"name": f"bomb-{i}-{n}"}, files=files)
                    n += 1

        await asyncio.gather(*(loop(i) for i in range(4)))

    async def _dribble(self, until: float, count: int, head: bytes, tail: bytes) -> None:
        socks = [s for s in (self.connect() for _ in range(count)) if s is not None]
        await asyncio.sleep(0.2)
        for sock in socks:
            await self.send(sock, head)
        position = 0
        while time.monotonic() < until:  # one byte a second on every connection
            for sock in socks:
                await self.send(sock, tail[position % len(tail) : position % len(tail) + 1])
            position += 1
            await asyncio.sleep(1.0)

    async def slow_headers(self, until: float) -> None:
        await self._dribble(until, 200, b"GET /health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 1000)

    async def slow_bodies(self, until: float) -> None:
        head = _request("POST", "/v1/audio/speech", b"", "application/json", self.args.api_key)
        head = head.replace(b"Content-Length: 0", b"Content-Length: 100000")
        await self._dribble(until, 50, head, b" " * 1000)

    async def idle_flood(self, until: float) -> None:
        for _ in range(self.args.idle):
            if self.connect() is None:
                break
        await asyncio.sleep(max(0.0, until - time.monotonic()))

    async def pathological_text(self, until: float) -> None:
        await self._flood(until, " " * 4095 + "a")

    async def request_flood(self, until: float) -> None:
        await self._flood(until, "Hello there.")

    async def _flood(self, until: float, text: str) -> None:
        body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}

        async def loop() -> None:
            async with httpx.AsyncClient(base_url=self.args.url, timeout=30, headers=headers) as client:
                while time.monotonic() < until:
                    await client.post("/v1/audio/speech", json=body)

        await asyncio.gather(*(loop() for _ in range(16)))


def _alive(sock: socket.socket) -> bool:
    try:
        data = sock.recv(1, socket.MSG_PEEK)
        return data != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


ATTACKS = [
    "baseline", "stalled-readers", "stalled-resend", "upload-bombs", "slow-headers", "slow-bodies", "idle-flood",
    "pathological-text", "request-flood",
]


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    require_loopback(args.url)
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    rows = []
    for name in args.attacks:
        attack = Attack(host, port, args)
        action: Callable[[float], Awaitable[None]] = getattr(attack, name.replace("-", "_"))
        prober = Prober(host, port)
        prober.start()
        until = time.monotonic() + args.duration
        try:
            await asyncio.wait_for(action(until), timeout=args.duration + 30)
        except (asyncio.TimeoutError, httpx.HTTPError):
            pass
        finally:
            prober.stop.set()
            prober.join(10)
            attack.close_all()
        await asyncio.sleep(args.settle)
        rows.append(await _row(name, prober, args))
        if attack.others:
            rows[-1]["others"] = dict(sorted(attack.others.items()))
    return rows


async def _row(name: str, prober: Prober, args: argparse.Namespace) -> dict[str, object]:
    lat = sorted(prober.latencies_ms)
    p95 = statistics.quantiles(lat, n=20)[-1] if len(lat) >= 2 else (lat[0] if lat else None)
    async with httpx.AsyncClient(base_url=args.url, timeout=10) as client:
        scraped = await _scrape(client)
    return {
        "attack": name,
        "probes": len(lat) + prober.failures,
        "failed": prober.failures,
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p95_ms": round(p95, 1) if p95 is not None else None,
        "max_ms": round(lat[-1], 1) if lat else None,
        "in_flight_after": scraped.get("chatterbox_in_flight_requests"),
        "queued_after": scraped.get("chatterbox_queued_requests"),
        "ffmpeg_after": ffmpeg_children(args.server_pid) if args.server_pid else None,
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| Attack | /health probes | failed | p50 ms | p95 ms | max ms | in flight / queued / FFmpeg after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['probes']} | {r['failed']} | {r['p50_ms']} | {r['p95_ms']} | {r['max_ms']} | "
            f"{_n(r['in_flight_after'])} / {_n(r['queued_after'])} / {_n(r['ffmpeg_after'])} |"
        )
    for r in rows:
        if "others" in r:
            lines.append(f"\n{r['attack']}: the other clients' requests: {r['others']}")
    return "\n".join(lines)


def _n(value: object) -> str:
    return "-" if value is None else str(int(value)) if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway.tools.attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of a gateway on this machine (loopback only)")
    p.add_argument("--duration", type=_bounded(1.0, MAX_DURATION_S), default=10.0, help="seconds per attack")
    p.add_argument("--settle", type=_bounded(0.0, 60.0), default=2.0, help="pause after each attack")
    p.add_argument("--stalled", type=_bounded(1, 256, int), default=32, help="stalled readers kept open")
    p.add_argument("--idle", type=_bounded(1, MAX_CONNECTIONS, int), default=1000, help="idle connections")
    p.add_argument("--others", type=_bounded(1, 200, int), default=8, help="other clients (stalled-resend)")
    p.add_argument("--attacks", type=lambda s: [a for a in s.split(",") if a], default=ATTACKS)
    p.add_argument("--budget-ms", type=float, default=50.0, help="p95 /health latency allowed under attack")
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        print(f"attack: unknown attacks {sorted(unknown)}; choose from {ATTACKS}", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(run(args))
    except NotLoopbackError as exc:
        print(f"attack: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    bad = [r for r in rows if r["failed"] or r["p95_ms"] is None or float(r["p95_ms"]) > args.budget_ms]  # type: ignore[arg-type]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
