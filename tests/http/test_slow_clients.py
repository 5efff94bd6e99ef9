"""Clients that send slowly or hold connections open (raw sockets, a real server on loopback
with the production configuration): header and body deadlines, the connection cap with
eviction of connections still waiting for headers, and a short request body that is a
client's failure, not a 500."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import msgspec
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from ops_support import HOLD, GatedEngine, connect, live_server, read_until_closed, wait_until


@contextmanager
def sockets(count: int, base_url: str) -> Iterator[list[socket.socket]]:
    opened = [connect(base_url) for _ in range(count)]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def guarded(settings: Settings, **limits: object) -> Settings:
    return msgspec.structs.replace(settings, **limits)


def test_headers_sent_a_byte_at_a_time_are_cut_off(settings: Settings) -> None:
    config = guarded(settings, header_timeout_s=0.5)
    with live_server(config, FakeEngine(), guarded=True) as live:
        sock = connect(live.base_url)
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        started = time.monotonic()
        closed = False
        for byte in request:  # bounded: 1 byte every 50 ms for at most ~12 s
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3:
                break
        received, _ = read_until_closed(sock, 15)
        sock.close()
        assert closed or received.startswith(b"HTTP/1.1 408"), received[:80]
        assert time.monotonic() - started < 15  # a stalled host's seconds allowed: the 408 says which deadline


def test_a_connection_that_sends_nothing_is_closed(settings: Settings) -> None:
    config = guarded(settings, header_timeout_s=0.5)
    with live_server(config, FakeEngine(), guarded=True) as live, sockets(20, live.base_url) as idle:
        for sock in idle:
            received, took = read_until_closed(sock, 15)
            assert took < 15 and received.startswith(b"HTTP/1.1 408")


def test_a_half_request_after_keep_alive_is_cut_off_too(settings: Settings) -> None:
    config = guarded(settings, header_timeout_s=0.5, keep_alive_timeout_s=30)
    with live_server(config, FakeEngine(), guarded=True) as live:
        sock = connect(live.base_url)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request never finishes
        received, took = read_until_closed(sock, 15)
        assert took < 15


def test_a_body_sent_slowly_is_cut_off_with_a_408_and_is_not_a_server_error(settings: Settings) -> None:
    config = guarded(settings, body_timeout_s=0.5, body_min_rate_bytes_s=0)
    with capture_logs() as logs, live_server(config, FakeEngine(), guarded=True) as live:
        sock = connect(live.base_url)
        sock.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\":"
        )
        started = time.monotonic()
        for _ in range(40):  # one byte every 0.1 s, bounded
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        received, took = read_until_closed(sock, 15)
        assert time.monotonic() - started < 15  # the message below names the body deadline
    assert received.startswith(b"HTTP/1.1 408"), received[:80]
    error = msgspec.json.decode(received.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "did not arrive within 0.5 s" in error["message"]
    # the app never saw a request whose body never came: no request line, nothing logged as an error
    assert not _speech_lines(logs) and not [e for e in logs if e.get("log_level") == "error"], logs


def test_a_body_shorter_than_its_content_length_is_a_client_failure(settings: Settings) -> None:
    """Content-Length 1000, 10 bytes, then close: no app work, no traceback, no error metric."""
    with capture_logs() as logs, live_server(settings, FakeEngine(), guarded=True) as live:
        sock = connect(live.base_url)
        sock.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\":1"
        )
        sock.close()
        time.sleep(0.5)
        metrics = httpx.get(f"{live.base_url}/metrics", timeout=5).text
    assert not _speech_lines(logs)
    assert not [e for e in logs if e.get("log_level") == "error"], logs
    assert 'route="/v1/audio/speech",outcome="error"' not in metrics


def test_a_large_body_cut_short_is_the_clients_failure(settings: Settings) -> None:
    """A body the app already reads (past 64 KiB) and that stops: logged as cancelled (499)."""
    config = guarded(settings, max_body_bytes=128 * 1024)
    with capture_logs() as logs, live_server(config, FakeEngine(), guarded=True) as live:
        sock = connect(live.base_url)
        sock.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"input\": \"" + b"a" * 80_000
        )
        time.sleep(0.3)
        sock.close()
        assert wait_until(lambda: _speech_lines(logs), timeout_s=15)
    _assert_client_failure(logs)


def _peek(sock: socket.socket) -> bytes:
    sock.settimeout(0.1)
    try:
        return sock.recv(200)
    except OSError as exc:
        return repr(exc).encode()


def _speech_lines(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e.get("event") == "request" and e.get("path") == "/v1/audio/speech"]


def _assert_client_failure(logs: list[dict[str, object]]) -> None:
    (line,) = _speech_lines(logs)
    assert line["outcome"] == "cancelled" and line["status"] != 500, line
    assert not [e for e in logs if e.get("log_level") == "error" and e.get("event") != "request"], logs


def test_an_idle_flood_cannot_lock_out_health(settings: Settings) -> None:
    """At the cap, the oldest connection still waiting for headers makes room."""
    config = guarded(settings, max_connections=30, header_timeout_s=60)
    with live_server(config, FakeEngine(), guarded=True) as live, sockets(60, live.base_url) as idle:
        idle[-1].sendall(b"GET /he")  # half a request, also evictable
        started = time.monotonic()
        answer = httpx.get(f"{live.base_url}/health", timeout=15)
        assert answer.status_code == 200
        assert time.monotonic() - started < 15  # locked out, it would wait out the 60 s header deadline
        closed = sum(1 for sock in idle[:30] if read_until_closed(sock, 10)[1] < 10)
        assert closed >= 25  # the oldest ones were evicted


def test_at_the_cap_with_every_connection_busy_new_ones_are_refused(settings: Settings) -> None:
    config = guarded(settings, max_connections=3, max_in_flight=4)
    engine = GatedEngine(hold_after=0)
    with live_server(config, engine, guarded=True) as live:
        body = (
            b'{"model":"tts-1","voice":"alloy","input":"' + HOLD.encode() + b' forever.","response_format":"pcm"}'
        )
        busy = [connect(live.base_url) for _ in range(3)]
        try:
            for sock in busy:
                sock.sendall(
                    b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                )
            assert wait_until(lambda: live.services.admission.in_flight == 3, timeout_s=10), [
                (live.services.admission.in_flight, len(engine.jobs)), [_peek(sock) for sock in busy]]
            extra = connect(live.base_url)
            received, took = read_until_closed(extra, 15)
            extra.close()
            assert received.startswith(b"HTTP/1.1 503") and took < 15, received[:80]
        finally:
            engine.gate.set()
            for sock in busy:
                sock.close()


def test_a_large_body_that_stalls_gets_408_and_its_request_line_says_so(settings: Settings) -> None:
    """The app is already reading this body (past 64 KiB) when it stops coming: the client gets
    the 408 envelope and the request's one line says 408 and why, not a bare disconnect."""
    config = guarded(settings, max_body_bytes=128 * 1024, body_rate_grace_s=0.3, body_min_rate_bytes_s=1_000_000)
    with capture_logs() as logs, live_server(config, FakeEngine(), guarded=True) as live:
        sock = connect(live.base_url)
        sock.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"input\": \"" + b"a" * 80_000
        )
        received, took = read_until_closed(sock, 5)
        sock.close()
        assert wait_until(lambda: _speech_lines(logs), timeout_s=15)
    assert received.startswith(b"HTTP/1.1 408"), received[:80]
    (line,) = _speech_lines(logs)
    assert (line["status"], line["outcome"]) == (408, "client_error"), line
    assert "slower than" in str(line["error"]), line
