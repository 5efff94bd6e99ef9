"""The attacks of issue 20 on what a connection holds before its request is whole, on raw
sockets (an HTTP client library would finish its bodies):

- :meth:`BodyAttacks.held_bodies`: speech headers with ``Content-Length: 100000``, then ``{``,
  then one byte every ``--hold-interval`` seconds; a dropped socket is replaced at once;
- :meth:`BodyAttacks.anonymous_bodies`: the same without an API key (a 401 on a server with
  keys, after which the client keeps sending its body);
- :meth:`BodyAttacks.big_bodies`: connections that each send all but the last byte of a
  ``--body-kib`` speech body and wait;
- :meth:`BodyAttacks.unfinished_uploads`: voice uploads of ``--upload-mib`` that stop just
  before the closing multipart boundary;
- :meth:`BodyAttacks.big_headers`: a 60 KB header in one write, four clients in a loop.

Every answer the server sends is counted by status (``answers`` in the table).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Awaitable, Callable

_SPEECH_HEAD = "POST /v1/audio/speech HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
_BIG_HEADER = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
_BOUNDARY = "attack-boundary-20"
BIG_BODY_ANSWER_WAIT_S = 10.0
"""How long a big body waits for its answer however short the attack: the server answers it
from the declared length at once, so only a silent server should count it as ``held``."""
LAST_LOOK_S = 2.0
"""How long a held body's connection, still open when the attack ends, waits for a last
answer: a host that stalls across the end delays the server's 408 past the run, not away."""


def _auth(key: str | None) -> str:
    return f"Authorization: Bearer {key}\r\n" if key else ""


def _status(answer: bytes) -> str:
    """The status code of an HTTP answer ("reset" when the connection was reset unanswered)."""
    parts = answer.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) >= 2 and answer.startswith(b"HTTP/") else "closed"


class BodyAttacks:
    """Raw-socket attacks bounded by ``max_sockets`` open at once (the tool's own cap)."""

    def __init__(self, host: str, port: int, *, api_key: str | None, max_sockets: int) -> None:
        self.address = (host, port)
        self.api_key = api_key
        self.max_sockets = max_sockets
        self.open: set[socket.socket] = set()
        self.answers: collections.Counter[str] = collections.Counter()

    async def connect(self) -> socket.socket | None:
        if len(self.open) >= self.max_sockets:
            return None
        sock = socket.socket()
        sock.setblocking(False)
        self.open.add(sock)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.address), timeout=5)
        except (OSError, asyncio.TimeoutError):
            self.close(sock)
            self.answers["connect_failed"] += 1
            return None
        return sock

    def close(self, sock: socket.socket) -> None:
        self.open.discard(sock)
        sock.close()

    def close_all(self) -> None:
        for sock in list(self.open):
            self.close(sock)

    async def send(self, sock: socket.socket, data: bytes, timeout_s: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), timeout=timeout_s)
            return True
        except (OSError, asyncio.TimeoutError):
            return False

    async def answer(self, sock: socket.socket, timeout_s: float) -> bytes | None:
        """What the server sends until it closes (None: nothing within ``timeout_s``; b"": it
        closed or reset the connection without a word)."""
        loop = asyncio.get_running_loop()
        try:
            first = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=timeout_s)
        except asyncio.TimeoutError:
            return None
        except OSError:
            return b""
        received = first
        try:
            while first:
                first = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=1.0)
                received += first
        except (OSError, asyncio.TimeoutError):
            pass
        return received

    def count(self, answer: bytes) -> None:
        self.answers[_status(answer) if answer else "reset"] += 1

    # ---- attacks ----------------------------------------------------------------------------

    async def held_bodies(self, until: float, sockets: int, interval_s: float) -> None:
        head = (_SPEECH_HEAD + _auth(self.api_key) + "Content-Length: 100000\r\n\r\n{").encode()
        await asyncio.gather(*(self._hold(until, head, interval_s) for _ in range(sockets)))

    async def anonymous_bodies(self, until: float, sockets: int, interval_s: float) -> None:
        head = (_SPEECH_HEAD + "Content-Length: 100000\r\n\r\n{").encode()
        await asyncio.gather(*(self._hold(until, head, interval_s) for _ in range(sockets)))

    async def _again_and_again(self, until: float, one: Callable[[socket.socket], Awaitable[None]]) -> None:
        """``one(connection)`` on a new connection each time, until ``until``."""
        while time.monotonic() < until:
            sock = await self.connect()
            if sock is None:
                await asyncio.sleep(0.1)
                continue
            try:
                await one(sock)
            finally:
                self.close(sock)

    async def _hold(self, until: float, head: bytes, interval_s: float) -> None:
        """Send ``head``, then a byte every ``interval_s``; when the server drops the
        connection, open another."""

        async def one(sock: socket.socket) -> None:
            if not await self.send(sock, head):
                self.count(b"")
                return
            while time.monotonic() < until:
                answer = await self.answer(sock, min(interval_s, max(0.01, until - time.monotonic())))
                if answer is not None:
                    self.count(answer)
                    return
                if not await self.send(sock, b" "):
                    self.count(b"")
                    return
            if (answer := await self.answer(sock, LAST_LOOK_S)) is not None:
                self.count(answer)  # answered after the run (silence is not counted: the run just ended)

        await self._again_and_again(until, one)

    async def big_bodies(self, until: float, sockets: int, body_bytes: int) -> None:
        head = (_SPEECH_HEAD + _auth(self.api_key) + f"Content-Length: {body_bytes}\r\n\r\n").encode()
        body = b'{"input": "' + b"a" * max(0, body_bytes - 12)
        # the server answers these at once (413 from the declared length): a machine that
        # stalls past ``until`` (a busy CI host) delays the answer but does not make it "held"
        await asyncio.gather(*(
            self._unfinished(until, head + body[: body_bytes - 1], wait_floor_s=BIG_BODY_ANSWER_WAIT_S)
            for _ in range(sockets)
        ))

    async def unfinished_uploads(self, until: float, uploads: int, upload_bytes: int) -> None:
        part = (
            f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nattack\r\n"
            f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"audio_sample\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        closing = f"\r\n--{_BOUNDARY}--\r\n".encode()
        body = part + b"\0" * upload_bytes + closing
        head = (
            "POST /v1/audio/voices HTTP/1.1\r\nHost: gateway\r\n" + _auth(self.api_key)
            + f"Content-Type: multipart/form-data; boundary={_BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        await asyncio.gather(*(self._unfinished(until, head + body[: -len(closing)]) for _ in range(uploads)))

    async def _unfinished(self, until: float, data: bytes, *, wait_floor_s: float = 0.0) -> None:
        """Send all of ``data`` (a request short of its end) and hold the connection for an
        answer until ``until``, or ``wait_floor_s`` from now if that is later."""
        deadline = max(until, time.monotonic() + wait_floor_s)
        sock = await self.connect()
        if sock is None:
            return
        try:
            sent = asyncio.ensure_future(self.send(sock, data, timeout_s=max(0.1, deadline - time.monotonic())))
            answer = await self.answer(sock, max(0.1, deadline - time.monotonic()))
            sent.cancel()
            if answer is None:
                self.answers["held"] += 1  # still open, unanswered, when the attack ended
            else:
                self.count(answer)
        finally:
            self.close(sock)

    async def big_headers(self, until: float) -> None:
        async def one(sock: socket.socket) -> None:
            await self.send(sock, _BIG_HEADER)
            # answered at once from the header's size: as long a wait as a big body's
            self.count(await self.answer(sock, BIG_BODY_ANSWER_WAIT_S) or b"")

        await asyncio.gather(*(self._again_and_again(until, one) for _ in range(4)))
