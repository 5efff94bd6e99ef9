"""TLS (``--ssl-certfile``/``--ssl-keyfile``) on a real server on loopback with the production
configuration, with a certificate made in the test: the OpenAI SDK over https trusting it, a
websocket over wss, and what an attacker would send: a handshake that never starts, one that
stops half way, a handshake flood at the connection cap, plain HTTP to the TLS port."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
import uvicorn
from litestar import Litestar, get, websocket_listener
from websockets.asyncio.client import connect as ws_connect

from gateway.cli import main as cli_main
from gateway.engine.fake import FakeEngine
from gateway.server.http_server import server_config
from gateway.settings import Settings, SettingsError, load_settings
from harness import serve_on_loopback
from ops_support import HOLD, GatedEngine, live_server, quiet_attempts, wait_until
from tls_support import TlsFiles, make_tls_files


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


def with_tls(settings: Settings, files: TlsFiles, **extra: object) -> Settings:
    return msgspec.structs.replace(
        settings, ssl_certfile=str(files.cert_file), ssl_keyfile=str(files.key_file), **extra
    )


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.split("://", 1)[1].split(":")
    return host, int(port)


def closed_within(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the server closed ``sock`` (inf if it did not within ``timeout_s``),
    reading and discarding whatever it sent."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, socket.timeout):
        return float("inf")
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def client_hello(files: TlsFiles) -> bytes:
    """The first flight a real TLS client sends (its ClientHello), made with an in-memory
    TLS object."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = files.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_openai_sdk_over_https(settings: Settings, tls_files: TlsFiles, valid_audio) -> None:
    engine = FakeEngine(piece_delay_s=0.01)
    trust = tls_files.client_context()
    with live_server(with_tls(settings, tls_files), engine, guarded=True, tls_client=trust) as live:
        assert live.base_url.startswith("https://")
        with httpx.Client(verify=trust) as http:
            sdk = openai.OpenAI(api_key="test", base_url=f"{live.base_url}/v1", http_client=http, max_retries=0)
            speech = sdk.audio.speech.create(model="tts-1", input="Hello over TLS.", voice="alloy", response_format="mp3")
            valid_audio(speech.content, "mp3")
            with sdk.audio.speech.with_streaming_response.create(
                model="tts-1", input="Streamed over TLS. " * 3, voice="alloy", response_format="wav"
            ) as response:
                valid_audio(response.read(), "wav")
            assert http.get(f"{live.base_url}/health").status_code == 200
        # A client that does not trust the certificate stops at its own verification...
        with httpx.Client() as untrusting:
            sdk = openai.OpenAI(api_key="test", base_url=f"{live.base_url}/v1", http_client=untrusting, max_retries=0)
            with pytest.raises(openai.APIConnectionError):
                sdk.audio.speech.create(model="tts-1", input="Hi.", voice="alloy")
        # ...and plain HTTP on the TLS port gets no HTTP answer.
        with pytest.raises(httpx.TransportError):
            httpx.get(live.base_url.replace("https://", "http://") + "/health", timeout=5)
        # the server is unaffected by both
        with httpx.Client(verify=trust) as http:
            assert http.get(f"{live.base_url}/ready").status_code == 200


def test_a_handshake_that_never_starts_is_closed_by_the_header_deadline(settings: Settings, tls_files: TlsFiles) -> None:
    config = with_tls(settings, tls_files, header_timeout_s=0.5)
    with live_server(config, FakeEngine(), guarded=True, tls_client=tls_files.client_context()) as live:
        with socket.create_connection(address(live.base_url), timeout=5) as silent:
            took = closed_within(silent, 15)
        assert 0.3 < took < 8, took  # after the deadline; a stalled host's seconds allowed
        with httpx.Client(verify=tls_files.client_context()) as http:
            assert http.get(f"{live.base_url}/health").status_code == 200


def test_a_handshake_that_stops_half_way_is_closed_by_the_header_deadline(settings: Settings, tls_files: TlsFiles) -> None:
    config = with_tls(settings, tls_files, header_timeout_s=0.5)
    hello = client_hello(tls_files)
    with live_server(config, FakeEngine(), guarded=True, tls_client=tls_files.client_context()) as live:
        # half a ClientHello, then nothing
        with socket.create_connection(address(live.base_url), timeout=5) as stalled:
            stalled.sendall(hello[: len(hello) // 2])
            took = closed_within(stalled, 15)
        assert 0.3 < took < 8, took
        # a whole ClientHello and then silence: the server answers its part, then gives up
        with socket.create_connection(address(live.base_url), timeout=5) as stalled:
            stalled.sendall(hello)
            took = closed_within(stalled, 15)
        assert 0.3 < took < 8, took


def test_after_the_handshake_the_header_deadline_still_applies(settings: Settings, tls_files: TlsFiles) -> None:
    config = with_tls(settings, tls_files, header_timeout_s=0.5)
    with live_server(config, FakeEngine(), guarded=True, tls_client=tls_files.client_context()) as live:
        raw = socket.create_connection(address(live.base_url), timeout=5)
        with tls_files.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            started = time.monotonic()
            tls.settimeout(15)
            received = b""
            try:
                while data := tls.recv(65536):
                    received += data
            except (ssl.SSLError, ConnectionResetError):
                pass
            assert received.startswith(b"HTTP/1.1 408"), received[:80]
            assert time.monotonic() - started < 8


def test_handshaking_connections_count_toward_the_cap(settings: Settings, tls_files: TlsFiles) -> None:
    # Three sockets that never handshake fill a cap of 3; a real client still gets through
    # (the oldest silent one is closed to make room), long before their 30 s deadline.
    config = with_tls(settings, tls_files, header_timeout_s=30, max_connections=3)
    trust = tls_files.client_context()
    with live_server(config, FakeEngine(), guarded=True, tls_client=trust) as live:
        host, port = address(live.base_url)
        silent = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.2)  # accepted by the server
            with httpx.Client(verify=trust, timeout=5) as http:
                assert http.get(f"{live.base_url}/health").status_code == 200
            assert closed_within(silent[0], 20) < 20  # the oldest was evicted (the deadline is 30 s)
            silent[1].settimeout(0.3)
            with pytest.raises((TimeoutError, socket.timeout)):
                silent[1].recv(1)  # the younger ones are kept until their own deadline
        finally:
            for sock in silent:
                sock.close()


def test_websockets_over_wss(settings: Settings, tls_files: TlsFiles) -> None:
    """With websockets' asyncio client. Its threaded (``sync``) client reads and writes one TLS
    session from two threads, which OpenSSL forbids: over TLS 1.3 (the server's session tickets
    arrive while the upgrade request is written) about 1 handshake in 300-400 hung here, the
    request never reaching the server (1000 runs of this test: 4; the same client over TLS 1.2:
    0 of 1500; the asyncio client: 0 of 3000). The server now sends no session tickets, which
    removed the hang (the sync client: 0 of 2500; the test below), but the threaded pattern stays
    unsafe in OpenSSL's terms. docs/operations.md, "TLS"."""
    @get("/ready")
    async def ready() -> str:
        return "ok"

    @websocket_listener("/echo")
    async def echo(data: str) -> str:
        return f"echo: {data}"

    app = Litestar([ready, echo])
    config: uvicorn.Config = server_config(app, with_tls(settings, tls_files))
    trust = tls_files.client_context()

    async def talk(url: str) -> list[str]:
        async with ws_connect(url, ssl=trust, open_timeout=5) as ws:
            answers = []
            for word in ("one", "two"):
                await ws.send(word)
                answers.append(await asyncio.wait_for(ws.recv(), 5))
            return answers

    with serve_on_loopback(app, config=config, tls_client=trust) as base_url:
        url = base_url.replace("https://", "wss://") + "/echo"
        assert asyncio.run(talk(url)) == ["echo: one", "echo: two"]


def test_the_server_sends_no_tls13_session_tickets(settings: Settings, tls_files: TlsFiles) -> None:
    """Tickets arriving while a threaded client writes its first request hung about 1 wss://
    connection in 300-400 of websockets' sync client (the elevenlabs SDK's realtime helper):
    the server sends none (``gateway.http.tls.load_tls_context``)."""
    @get("/ready")
    async def ready() -> str:
        return "ok"

    app = Litestar([ready])
    config: uvicorn.Config = server_config(app, with_tls(settings, tls_files))
    trust = tls_files.client_context()
    with serve_on_loopback(app, config=config, tls_client=trust) as base_url:
        host, port = address(base_url)
        with socket.create_connection((host, port), timeout=5) as raw, \
                trust.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() == "TLSv1.3"
            tls.sendall(b"GET /ready HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := tls.recv(4096):  # the whole exchange, tickets included were there any
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            assert tls.session is not None and not tls.session.has_ticket


def test_tls_settings_are_checked_before_the_server_starts(tmp_path: Path, capsys) -> None:
    with pytest.raises(SettingsError, match="ssl_keyfile needs ssl_certfile"):
        load_settings(environ={}, overrides={"ssl_keyfile": str(tmp_path / "key.pem")})
    missing = tmp_path / "missing.pem"
    code = cli_main(["serve", "--engine", "fake", "--cache-dir", str(tmp_path), "--ssl-certfile", str(missing)])
    assert code == 2
    error = capsys.readouterr().err
    assert "ssl_certfile" in error and str(missing) in error and "Traceback" not in error
    files = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other")
    # a key that is not the certificate's
    code = cli_main(
        ["serve", "--engine", "fake", "--cache-dir", str(tmp_path), "--ssl-certfile", str(files.cert_file),
         "--ssl-keyfile", str(other.key_file)]
    )
    assert code == 2
    assert "ssl_certfile" in capsys.readouterr().err


def test_a_cap_full_of_busy_connections_closes_the_next_one_before_its_handshake(
    settings: Settings, tls_files: TlsFiles
) -> None:
    # Handshaking sockets are evicted first; when every connection is serving a request, the
    # next one is closed at once (no HTTP 503 can be spoken before TLS), and the busy ones finish.
    engine = GatedEngine(hold_after=0)
    config = with_tls(settings, tls_files, max_connections=2, header_timeout_s=5)
    trust = tls_files.client_context()
    body = {"model": "tts-1", "voice": "alloy", "input": f"{HOLD} please.", "response_format": "pcm"}
    with live_server(config, engine, guarded=True, tls_client=trust) as live:
        results: list[int] = []

        def held() -> None:
            try:
                with httpx.Client(verify=trust, timeout=10) as http:
                    results.append(http.post(f"{live.base_url}/v1/audio/speech", json=body).status_code)
            except httpx.TransportError:
                results.append(-1)

        workers = [threading.Thread(target=held) for _ in range(2)]
        for worker in workers:
            worker.start()
        assert wait_until(lambda: len(engine.jobs) == 2, 15)
        for _ in quiet_attempts():  # "at once" is wall time: a stalled host measures again
            started = time.monotonic()
            with httpx.Client(verify=trust, timeout=5) as http:
                with pytest.raises(httpx.TransportError):
                    http.get(f"{live.base_url}/health")
            took = time.monotonic() - started
        assert took < 2, took  # closed, not left to the 5 s header deadline
        engine.gate.set()
        for worker in workers:
            worker.join(10)
        assert results == [200, 200]
