"""A short adversarial run: each attack of issues 8 and 20 in turn against a gateway on this
machine, while a prober (a process of its own: :mod:`gateway.tools.health_prober`) asks
``GET /health`` on a fresh connection every 100 ms.

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
  hammering the server cost whatever their text);
- issue 20 (:mod:`gateway.tools.attack_bodies`): ``held-bodies`` (``--held`` sockets that
  send speech headers, ``{`` and then a byte every ``--hold-interval`` s, replaced when
  dropped), ``anonymous-bodies`` (the same without a key), ``big-bodies`` (``--big``
  connections each holding all but one byte of a ``--body-kib`` speech body),
  ``unfinished-uploads`` (``--uploads`` voice uploads of ``--upload-mib`` that never send
  their last boundary), ``big-headers`` (a 60 KB header in one write).

Reported per attack: /health probes, failures, p50/p90/p95/max latency, the answers the
attack's own raw-socket requests got (by status), and with ``--server-pid`` the server's RSS
(before, peak, after), its temporary-file bytes (peak, after) and open descriptors after;
and afterwards what the server still holds (in flight, queued, FFmpeg children). Exit status
1 when a probe failed or p95 exceeded ``--budget-ms`` (50) under any attack. Repeat a name
in ``--attacks`` to run it in rounds (e.g. stalled readers against ``--audio-encoder ffmpeg``,
watching the descriptors).

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
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from gateway.tools.attack_bodies import BodyAttacks
from gateway.tools.health_prober import Prober, ProbeResults
from gateway.tools import host_probes
from gateway.tools.loadtest import NotLoopbackError, _bounded, _scrape, ffmpeg_children, require_loopback
from gateway.tools.server_watch import ServerWatch, open_fds

MAX_DURATION_S = 60.0
MAX_CONNECTIONS = 2000
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


class Attack:
    def __init__(self, host: str, port: int, args: argparse.Namespace) -> None:
        self.host, self.port, self.args = host, port, args
        self.sockets: list[socket.socket] = []
        self.others: dict[str, int] = {}
        """Outcomes of the other clients' requests (``stalled-resend``): ok, a status, failed."""
        self.bodies = BodyAttacks(host, port, api_key=args.api_key, max_sockets=MAX_CONNECTIONS)

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
        self.bodies.close_all()

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

    async def held_bodies(self, until: float) -> None:
        await self.bodies.held_bodies(until, self.args.held, self.args.hold_interval)

    async def anonymous_bodies(self, until: float) -> None:
        await self.bodies.anonymous_bodies(until, self.args.held, self.args.hold_interval)

    async def big_bodies(self, until: float) -> None:
        await self.bodies.big_bodies(until, self.args.big, self.args.body_kib * 1024)

    async def unfinished_uploads(self, until: float) -> None:
        await self.bodies.unfinished_uploads(until, self.args.uploads, int(self.args.upload_mib * 1_048_576))

    async def big_headers(self, until: float) -> None:
        await self.bodies.big_headers(until)

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
    "held-bodies", "anonymous-bodies", "big-bodies", "unfinished-uploads", "big-headers",
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
        probes = ProbeResults()
        watch = ServerWatch(args.server_pid) if args.server_pid else None
        if watch is not None:
            watch.start()
        until = time.monotonic() + args.duration
        try:
            await asyncio.wait_for(action(until), timeout=args.duration + 30)
            # an attack the server ended early (every request refused) is still probed for
            # the whole duration: the rows compare like with like
            await asyncio.sleep(max(0.0, until - time.monotonic()))
        except (asyncio.TimeoutError, httpx.HTTPError):
            pass
        finally:
            probes = prober.finish()
            attack.close_all()
            if watch is not None:
                watch.stop.set()
                watch.join(10)
        await asyncio.sleep(args.settle)
        rows.append(await _row(name, probes, watch, attack, args))
        if attack.others:
            rows[-1]["others"] = dict(sorted(attack.others.items()))
    return rows


async def _row(
    name: str, prober: ProbeResults, watch: ServerWatch | None, attack: Attack, args: argparse.Namespace
) -> dict[str, object]:
    lat = sorted(prober.latencies_ms)
    cuts = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) >= 2 else None
    p90 = cuts[17] if cuts else (lat[0] if lat else None)
    p95 = cuts[-1] if cuts else (lat[0] if lat else None)
    async with httpx.AsyncClient(base_url=args.url, timeout=10) as client:
        scraped = await _scrape(client)
    pid = args.server_pid
    return {
        "attack": name,
        "probes": len(lat) + prober.failures,
        "failed": prober.failures,
        "failures": prober.failure_kinds,
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p90_ms": round(p90, 1) if p90 is not None else None,
        "p95_ms": round(p95, 1) if p95 is not None else None,
        "max_ms": round(lat[-1], 1) if lat else None,
        "answers": dict(attack.bodies.answers.most_common()),
        "rss_mib": None if watch is None else {
            "before": host_probes.mib(watch.rss_before), "peak": host_probes.mib(watch.peak_rss), "after": host_probes.mib(host_probes.rss_bytes(pid)),
        },
        "temp_mib": None if watch is None else {
            "before": host_probes.mib(watch.temp_before), "peak": host_probes.mib(watch.peak_temp), "after": host_probes.mib(watch.temp_bytes()),
        },
        "fds_after": open_fds(pid) if pid else None,
        "in_flight_after": scraped.get("chatterbox_in_flight_requests"),
        "queued_after": scraped.get("chatterbox_queued_requests"),
        "ffmpeg_after": ffmpeg_children(pid) if pid else None,
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| Attack | /health probes | failed | p50 ms | p90 ms | p95 ms | max ms | answers | RSS MiB before / peak / after "
        "| temp MiB before / peak / after | fds after | in flight / queued / FFmpeg after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        answers = ", ".join(f"{k} {v}" for k, v in r["answers"].items()) or "-"  # type: ignore[attr-defined]
        rss = r["rss_mib"] or {}
        temp = r["temp_mib"] or {}
        lines.append(
            f"| {r['attack']} | {r['probes']} | {r['failed']} | {r['p50_ms']} | {r['p90_ms']} | {r['p95_ms']} | "
            f"{r['max_ms']} | {answers} | "
            f"{_n(rss.get('before'))} / {_n(rss.get('peak'))} / {_n(rss.get('after'))} | "  # type: ignore[union-attr]
            f"{_n(temp.get('before'))} / {_n(temp.get('peak'))} / {_n(temp.get('after'))} | {_n(r['fds_after'])} | "  # type: ignore[union-attr]
            f"{_n(r['in_flight_after'])} / {_n(r['queued_after'])} / {_n(r['ffmpeg_after'])} |"
        )
    for r in rows:
        if "others" in r:
            lines.append(f"\n{r['attack']}: the other clients' requests: {r['others']}")
    return "\n".join(lines)


def _n(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway.tools.attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of a gateway on this machine (loopback only)")
    p.add_argument("--duration", type=_bounded(1.0, MAX_DURATION_S), default=10.0, help="seconds per attack")
    p.add_argument("--settle", type=_bounded(0.0, 60.0), default=2.0, help="pause after each attack")
    p.add_argument("--stalled", type=_bounded(1, 256, int), default=32, help="stalled readers kept open")
    p.add_argument("--idle", type=_bounded(1, MAX_CONNECTIONS, int), default=1000, help="idle connections")
    p.add_argument("--others", type=_bounded(1, 200, int), default=8, help="other clients (stalled-resend)")
    p.add_argument("--held", type=_bounded(1, MAX_CONNECTIONS, int), default=1050,
                   help="held-bodies / anonymous-bodies: sockets kept sending a body a byte at a time")
    p.add_argument("--hold-interval", type=_bounded(0.1, 30.0), default=5.0, help="seconds between their bytes")
    p.add_argument("--big", type=_bounded(1, MAX_CONNECTIONS, int), default=990, help="big-bodies: connections")
    p.add_argument("--body-kib", type=_bounded(1, 16384, int), default=1024, help="big-bodies: body size (KiB)")
    p.add_argument("--uploads", type=_bounded(1, 1000, int), default=100, help="unfinished-uploads: connections")
    p.add_argument("--upload-mib", type=_bounded(0.1, 64.0), default=10.0, help="unfinished-uploads: clip size")
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
