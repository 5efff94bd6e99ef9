"""A client that stops reading cannot hold its slot (real server on loopback, raw sockets with
a tiny receive buffer that are never read): past ``send_timeout_s`` for one pending write, or
past ``request_timeout_s`` for the whole response, the response is dropped like a disconnect:
the engine job is cancelled, FFmpeg reaped, the admission slot given back, and the request
logged with outcome ``timeout``; other clients are served meanwhile."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import ffmpeg_children
from ops_support import live_server, wait_until

LONG_INPUT = ("A sentence that goes on and on for the listener who never listens. " * 61)[:4096]


def stalled_request(base_url: str, *, response_format: str, stream_format: str, speed: float) -> socket.socket:
    """POST a long speech request from a socket with a tiny receive buffer, and never read."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((host, int(port)))
    body = json.dumps(
        {"model": "tts-1", "voice": "alloy", "input": LONG_INPUT, "response_format": response_format,
         "stream_format": stream_format, "speed": speed}
    ).encode()
    head = (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


@contextmanager
def stalled(base_url: str, count: int, **kw: object) -> Iterator[list[socket.socket]]:
    socks = [stalled_request(base_url, **kw) for _ in range(count)]  # type: ignore[arg-type]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def access_lines(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [line for line in logs if line.get("event") == "request" and line.get("path") == "/v1/audio/speech"]


@pytest.mark.parametrize(
    ("response_format", "stream_format", "speed"),
    [("wav", "audio", 0.25), ("pcm", "sse", 0.25)],
)
def test_a_reader_that_stops_gives_its_slot_back_after_send_timeout(
    settings: Settings, response_format: str, stream_format: str, speed: float
) -> None:
    config = msgspec.structs.replace(
        settings, max_in_flight=2, max_queued=0, max_speech_tokens=400, send_timeout_s=1.0, request_timeout_s=60
    )
    engine = FakeEngine()
    with capture_logs() as logs, live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        with stalled(live.base_url, 2, response_format=response_format, stream_format=stream_format, speed=speed):
            assert wait_until(lambda: admission.in_flight == 2, timeout_s=10), "the stalled requests never started"
            started = time.monotonic()
            # without a send deadline they hold both slots for as long as they like
            assert wait_until(lambda: admission.in_flight == 0, timeout_s=15), "stalled readers kept their slots"
            released_after = time.monotonic() - started
            assert wait_until(lambda: len(engine.cancelled) == 2, timeout_s=15), engine.cancelled
            assert wait_until(lambda: not ffmpeg_children(), timeout_s=15), ffmpeg_children()
            # the server serves others at once
            answer = httpx.post(
                f"{live.base_url}/v1/audio/speech",
                json={"model": "tts-1", "voice": "alloy", "input": "Still here.", "response_format": "wav"},
                timeout=10,
            )
            assert answer.status_code == 200 and answer.content[:4] == b"RIFF"
    assert released_after < 10
    outcomes = [line["outcome"] for line in access_lines(logs)]
    assert outcomes.count("timeout") == 2, access_lines(logs)


def test_the_whole_response_is_bounded_by_request_timeout(settings: Settings) -> None:
    # one pending write may wait a minute, but the whole request only 2 s (+1 s margin)
    config = msgspec.structs.replace(
        settings, max_in_flight=1, max_queued=0, max_speech_tokens=400, send_timeout_s=60.0, request_timeout_s=2.0
    )
    engine = FakeEngine(piece_delay_s=0.02)  # the job outlasts the deadline
    with live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        with stalled(live.base_url, 1, response_format="wav", stream_format="audio", speed=0.25):
            assert wait_until(lambda: admission.in_flight == 1, timeout_s=10)
            assert wait_until(lambda: admission.in_flight == 0, timeout_s=8), "the response outlived request_timeout_s"
            assert wait_until(lambda: engine.cancelled != [], timeout_s=15)
            assert wait_until(lambda: not ffmpeg_children(), timeout_s=15)


def test_a_dropped_response_frees_its_socket(settings: Settings) -> None:
    """The server closes its descriptor instead of waiting forever to flush an unread buffer
    (the kernel may still hold the orphaned socket: /proc/net/tcp shows it with inode 0)."""
    config = msgspec.structs.replace(settings, max_in_flight=1, max_speech_tokens=400, send_timeout_s=1.0)
    with live_server(config, FakeEngine(), guarded=True) as live:
        with stalled(live.base_url, 1, response_format="wav", stream_format="audio", speed=0.25) as (sock,):
            server_port, client_port = sock.getpeername()[1], sock.getsockname()[1]
            assert wait_until(lambda: _server_socket_inode(server_port, client_port) not in (None, 0), timeout_s=15)
            assert wait_until(lambda: live.services.admission.in_flight == 0, timeout_s=15)
            assert wait_until(lambda: _server_socket_inode(server_port, client_port) in (None, 0), timeout_s=15)


def _server_socket_inode(server_port: int, client_port: int) -> int | None:
    """Inode of the server's end of a loopback connection (0: no process holds it)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(fields[9])
    return None


def _pipe_fds() -> set[str]:
    """This process's open pipe descriptors (the server runs in one of its threads)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(f"{name}->{target}")
    return found


def test_streams_dropped_by_the_send_timeout_leave_no_ffmpeg_pipe_open(settings: Settings) -> None:
    """Issue 20: with the FFmpeg-process encoder, every stalled stream dropped by the send
    timeout left one pipe descriptor open (9 -> 37 over 4 rounds of 8); here 2 rounds of 3."""
    config = msgspec.structs.replace(
        settings, audio_encoder="ffmpeg", max_in_flight=3, max_speech_tokens=400, send_timeout_s=1.0
    )
    with live_server(config, FakeEngine(), guarded=True) as live:
        admission = live.services.admission
        before = _pipe_fds()
        for _ in range(2):
            with stalled(live.base_url, 3, response_format="mp3", stream_format="audio", speed=0.25):
                assert wait_until(lambda: admission.in_flight == 3, timeout_s=10)
                assert wait_until(lambda: admission.in_flight == 0, timeout_s=15), "stalled readers kept their slots"
                assert wait_until(lambda: not ffmpeg_children(), timeout_s=15), ffmpeg_children()
        # no garbage collection asked for: the pipes must be closed by the stream's own cleanup
        assert wait_until(lambda: _pipe_fds() <= before, timeout_s=15), _pipe_fds() - before


def test_a_stream_cut_by_its_time_limit_logs_one_line_not_a_traceback(settings: Settings) -> None:
    """Issue 20: each stream past request_timeout_s logged ~6 KB of "Exception in ASGI
    application"; the request's own line (outcome timeout) is all that is needed."""
    config = msgspec.structs.replace(settings, max_speech_tokens=400, request_timeout_s=1.0)
    engine = FakeEngine(piece_delay_s=0.2)  # the stream outlasts the limit while the client reads
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        with capture_logs() as logs, live_server(config, engine, guarded=True) as live:
            with pytest.raises(httpx.RemoteProtocolError):  # the audio is cut, not completed
                with httpx.stream(
                    "POST", f"{live.base_url}/v1/audio/speech", timeout=10,
                    json={"model": "tts-1", "voice": "alloy", "input": "Hello there. " * 40, "response_format": "wav"},
                ) as answer:
                    assert answer.status_code == 200
                    for _ in answer.iter_bytes():
                        pass
            assert wait_until(lambda: access_lines(logs), timeout_s=15)
    finally:
        logging.getLogger().removeHandler(handler)
    (line,) = access_lines(logs)
    assert line["outcome"] == "timeout" and "time limit" in str(line["error"]), line
    assert not [r for r in records if r.exc_info or "Exception in ASGI" in r.getMessage()], [
        r.getMessage() for r in records
    ]
    assert not [e for e in logs if e is not line and (e.get("exc_info") or e.get("log_level") == "error")], logs
