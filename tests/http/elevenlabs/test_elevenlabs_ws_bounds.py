"""What an attacker (or a broken client) can do to the text-to-speech WebSockets, on a real
server with the production limits: every malformed message and exceeded bound gets an error
message and a policy close (1008; 1009 for a message too large; never 1011), the socket's work
is released, and the server goes on serving."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time

import msgspec
import pytest
import websockets
from elevenlabs_support import KEY, Received, face_settings, read_until, read_until_closed, send, ws_url
from ops_support import HOLD, GatedEngine, quiet_attempts, live_server, wait_until
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.http.elevenlabs.face import face_of
from gateway.settings import Settings


@pytest.fixture
def live(settings: Settings):
    with live_server(face_settings(settings, elevenlabs_max_message_bytes=4096), FakeEngine(), guarded=True) as server:
        yield server


async def expect_error_close(url: str, *messages: str | bytes, code: int = 1008, error: str | None = None) -> Received:
    """Send ``messages`` raw; the server answers an error message and closes with ``code``."""
    received = Received()
    async with websockets.connect(url) as ws:
        for message in messages:
            await ws.send(message)
        await read_until_closed(ws, received)
    assert received.close_code == code, (received.close_code, received.messages)
    if code != 1009:  # too large: refused by the WebSocket layer before any handler reads it
        (err,) = received.errors()
        assert set(err) >= {"message", "error", "code"} and err["code"] == code, err
        if error is not None:
            assert err["error"] == error, err
    return received


async def still_serving(base_url: str) -> None:
    received = Received()
    async with websockets.connect(ws_url(base_url, output_format="pcm_16000")) as ws:
        await send(ws, text="Still here.")
        await send(ws, text="")
        await read_until_closed(ws, received)
    assert received.close_code == 1000 and received.audio()


@pytest.mark.parametrize(
    ("message", "mentions"),
    [
        ("{not json", "JSON"),
        ("[1, 2, 3]", "object"),
        ('"a string"', "object"),
        ('{"text": 5}', "$.text"),
        ('{"text": "hi", "flush": "yes"}', "$.flush"),
        ('{"text": " ", "generation_config": {"chunk_length_schedule": [10]}}', "chunk_length_schedule"),
        ('{"text": " ", "generation_config": {"chunk_length_schedule": []}}', "chunk_length_schedule"),
        ('{"text": " ", "voice_settings": {"stability": 7}}', "stability"),
        ('{"text": "\\ud800"}', ""),
        ("[" * 2000 + "]" * 2000, ""),
    ],
)
async def test_malformed_messages_get_an_error_and_1008(live, message: str, mentions: str) -> None:
    received = await expect_error_close(ws_url(live.base_url), message, error="invalid_input_message")
    assert mentions in received.errors()[0]["message"]
    await still_serving(live.base_url)


async def test_binary_frames_and_oversized_messages(live) -> None:
    await expect_error_close(ws_url(live.base_url), b"\x00\x01binary", error="invalid_input_message")
    await expect_error_close(ws_url(live.base_url), json.dumps({"text": "x" * 5000}), code=1009)
    await still_serving(live.base_url)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"output_format": "mp3_1_2"}, "invalid_output_format"),
        ({"model_id": "gpt-5-tts"}, "model_not_found"),
        ({"inactivity_timeout": "soon"}, "invalid_value"),
        ({"auto_mode": "maybe"}, "invalid_value"),
        ({"seed": "-4"}, "invalid_value"),
    ],
)
async def test_bad_query_parameters_fail_the_socket_at_once(live, query: dict, error: str) -> None:
    await expect_error_close(ws_url(live.base_url, **query), error=error)


async def test_an_unknown_voice_fails_the_socket_at_once(live) -> None:
    received = await expect_error_close(ws_url(live.base_url, "nobody"), error="voice_not_found")
    assert "nobody" in received.errors()[0]["message"]


async def test_too_many_contexts_on_one_socket(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(face_settings(settings, elevenlabs_max_contexts=2), engine, guarded=True) as server:
        received = Received()
        async with websockets.connect(ws_url(server.base_url, multi=True)) as ws:
            for context in ("a", "b", "c"):
                await send(ws, text=f"{HOLD} context {context} holds on.", context_id=context, flush=True)
            await read_until_closed(ws, received)
        assert received.close_code == 1008 and received.errors()[-1]["error"] == "too_many_contexts"
        # closing the socket cancelled the two held contexts: nothing is left running
        assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 0, 5)
        assert await asyncio.to_thread(wait_until, lambda: face_of(server.app).open_contexts == 0, 5)


async def test_text_buffered_past_the_limit(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    with live_server(face_settings(settings, elevenlabs_max_buffered_chars=600), engine, guarded=True) as server:
        received = Received()
        async with websockets.connect(ws_url(server.base_url, auto_mode="true")) as ws:
            await send(ws, text=f"{HOLD} the engine is stuck on this one. ")
            assert await asyncio.to_thread(engine.holding.wait, 10)
            for _ in range(20):  # faster than it can be spoken
                await send(ws, text="More and more text that nobody will ever hear. ")
            await read_until_closed(ws, received)
        assert received.close_code == 1008 and received.errors()[-1]["error"] == "buffer_limit_exceeded"
        assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 0, 5)
        assert engine.cancelled


async def test_inactivity_closes_quiet_sockets_and_keepalives_hold_them(settings: Settings) -> None:
    config = face_settings(settings, elevenlabs_inactivity_timeout_s=1.0, elevenlabs_max_inactivity_timeout_s=2.0)
    with live_server(config, FakeEngine(), guarded=True) as server:
        started = time.monotonic()
        received = await expect_error_close(ws_url(server.base_url), '{"text": " "}', error="input_timeout_exceeded")
        assert 0.9 < time.monotonic() - started < 15  # not before the timeout; a stalled host's seconds allowed
        assert "1 seconds" in received.errors()[0]["message"]
        # keepalives every 0.25 s keep a multi-stream socket open past the timeout (a host
        # that stalls between two of them makes the client silent for a second: again)
        for _ in quiet_attempts():
            received = Received()
            async with websockets.connect(ws_url(server.base_url, multi=True)) as ws:
                for _ in range(10):
                    await send(ws, text="")
                    await asyncio.sleep(0.25)
                await send(ws, text="Still open.", context_id="k", flush=True)
                await send(ws, close_socket=True)
                await read_until_closed(ws, received)
        assert received.close_code == 1000 and received.audio("k")
        # a client may ask for a longer timeout, up to the server's maximum (2 s here)
        for _ in quiet_attempts():
            async with websockets.connect(ws_url(server.base_url, inactivity_timeout=180)) as ws:
                await asyncio.sleep(1.3)
                await send(ws, text="Spoken after 1.3 s of silence.")
                await send(ws, text="")
                received = await read_until_closed(ws, Received())
        assert received.close_code == 1000


async def test_a_socket_has_a_lifetime(settings: Settings) -> None:
    config = face_settings(settings, elevenlabs_max_socket_s=0.8)
    with live_server(config, FakeEngine(), guarded=True) as server:
        received = Received()
        async with websockets.connect(ws_url(server.base_url, multi=True)) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                for _ in range(20):
                    await send(ws, text="")  # busy, but not forever
                    await asyncio.sleep(0.15)
            await read_until_closed(ws, received)
        assert received.close_code == 1008 and received.errors()[-1]["error"] == "socket_time_limit"


async def test_sockets_in_all_are_capped_before_the_upgrade(settings: Settings) -> None:
    with live_server(face_settings(settings, elevenlabs_max_sockets=2), FakeEngine(), guarded=True) as server:
        async with websockets.connect(ws_url(server.base_url)) as one, websockets.connect(ws_url(server.base_url)) as two:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(ws_url(server.base_url))
            assert refused.value.response.status_code == 503
            assert json.loads(refused.value.response.body)["detail"]["status"] == "too_many_sockets"
            assert refused.value.response.headers["retry-after"] == "1"
            await one.close()
            await two.close()
        assert await asyncio.to_thread(wait_until, lambda: face_of(server.app).open_sockets == 0, 5)
        await still_serving(server.base_url)


async def test_keys_in_the_handshake_or_the_first_message(settings: Settings) -> None:
    with live_server(face_settings(settings, api_keys=(KEY,)), FakeEngine(), guarded=True) as server:
        url = ws_url(server.base_url)
        for headers in ({"xi-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
            async with websockets.connect(url, additional_headers=headers) as ws:
                await send(ws, text="With a key.")
                await send(ws, text="")
                assert (await read_until_closed(ws, Received())).close_code == 1000
        async with websockets.connect(ws_url(server.base_url, authorization=f"Bearer%20{KEY}")) as ws:
            await send(ws, text="Key in the query.")
            await send(ws, text="")
            assert (await read_until_closed(ws, Received())).close_code == 1000
        async with websockets.connect(url) as ws:  # no key in the handshake: the first message
            await send(ws, text=" ", xi_api_key=KEY)
            await send(ws, text="")
            assert (await read_until_closed(ws, Received())).close_code == 1000
        await expect_error_close(url, json.dumps({"text": "No key at all."}), error="invalid_api_key")
        await expect_error_close(url, json.dumps({"text": " ", "xi_api_key": "wrong"}), error="invalid_api_key")
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, additional_headers={"xi-api-key": "wrong"})
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["detail"]["status"] == "invalid_api_key"


async def test_overload_fails_the_context_with_1013_not_the_server(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    config = face_settings(settings, max_in_flight=1, max_queued=0)
    with live_server(config, engine, guarded=True) as server:
        async with websockets.connect(ws_url(server.base_url, multi=True)) as busy:
            await send(busy, text=f"{HOLD} holding the only slot.", context_id="h", flush=True)
            assert await asyncio.to_thread(engine.holding.wait, 10)
            # stream-input: the one utterance failed: the error, then close 1013 (try again later)
            await expect_error_close(ws_url(server.base_url), json.dumps({"text": "No room.", "flush": True}), code=1013, error="server_overloaded")
            # multi-stream-input: that context fails (error + isFinal), the socket stays open
            received = Received()
            async with websockets.connect(ws_url(server.base_url, multi=True)) as ws:
                await send(ws, text="No room either.", context_id="n", flush=True)
                await read_until(ws, received, lambda m: m.get("isFinal") is True)
                assert received.errors()[0]["contextId"] == "n" and received.errors()[0]["code"] == 1013
                await send(ws, text="")  # still open
            engine.gate.set()


def _raw_websocket(base_url: str, path: str) -> socket.socket:
    """A WebSocket from a socket with a tiny receive buffer that the test never reads."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _text_frame(payload: str) -> bytes:
    data = payload.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    length = len(data)
    header = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + struct.pack("!H", length))
    return header + mask + masked


async def test_a_client_that_stops_reading_is_dropped_and_its_work_released(settings: Settings) -> None:
    config = face_settings(settings, send_timeout_s=1.0, max_speech_tokens=1000)
    engine = FakeEngine()
    with capture_logs() as logs, live_server(config, engine, guarded=True) as server:
        sock = _raw_websocket(server.base_url, "/v1/text-to-speech/alloy/stream-input?output_format=pcm_48000")
        try:
            text = "A long text for a listener who never reads a single message. " * 40
            sock.sendall(_text_frame(json.dumps({"text": text, "voice_settings": {"speed": 0.25}, "flush": True})))
            assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 1, 10)
            started = time.monotonic()
            assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 0, 20)
            assert time.monotonic() - started < 15
            assert await asyncio.to_thread(wait_until, lambda: face_of(server.app).open_sockets == 0, 5)
            assert engine.cancelled  # the job was dropped, not finished
        finally:
            sock.close()
        await still_serving(server.base_url)
    (line,) = [e for e in logs if e["event"] == "websocket" and e.get("outcome") == "timeout"]
    assert "pending" in line["error"]


async def test_many_sockets_opened_and_abandoned_leave_nothing_behind(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    with live_server(face_settings(settings), engine, guarded=True) as server:
        for i in range(12):
            async with websockets.connect(ws_url(server.base_url, multi=bool(i % 2))) as ws:
                await send(ws, text=f"{HOLD} abandoned number {i}, with enough words to speak a while.", context_id="z", flush=True)
                await ws.recv()
        face = face_of(server.app)
        assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 0, 10)
        assert await asyncio.to_thread(wait_until, lambda: face.open_sockets == face.open_contexts == 0, 5)
        assert len(engine.cancelled) == 12
        await still_serving(server.base_url)


def _frames(sock: socket.socket, timeout_s: float) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every frame the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            data += chunk
    frames = []
    while len(data) >= 2:
        opcode, length, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, at = struct.unpack("!H", data[2:4])[0], 4
        frames.append((opcode, data[at : at + length]))
        data = data[at + length :]
    return frames


async def test_a_peer_that_stops_answering_pings_is_closed_as_going_away(settings: Settings) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.http.connection_guard import GuardedWebSocketProtocol
    from harness import serve_on_loopback

    app = create_app(face_settings(settings), engine=FakeEngine())
    config = uvicorn.Config(
        app, log_config=None, lifespan="on", ws=GuardedWebSocketProtocol, ws_ping_interval=0.2, ws_ping_timeout=0.3
    )
    with serve_on_loopback(app, config=config) as base_url:
        sock = _raw_websocket(base_url, "/v1/text-to-speech/alloy/multi-stream-input")
        try:
            frames = await asyncio.to_thread(_frames, sock, 5.0)  # pings arrive; we never pong
        finally:
            sock.close()
        assert frames[0][0] == 0x9  # a ping
        opcode, payload = frames[-1]
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1001, frames
        assert await asyncio.to_thread(wait_until, lambda: face_of(app).open_sockets == 0, 5)
