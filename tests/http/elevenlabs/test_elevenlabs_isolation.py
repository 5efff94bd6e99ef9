"""The ElevenLabs face keeps the isolation the OpenAI routes have (issue 20 on issue 19's routes):
voices belong to keys (another key's voice is an unknown voice on the REST routes, in the
listing and on both WebSockets), a WebSocket authenticated by its first message is that key's
(its voices, its fair share, its id on the log lines), and every chunk a socket speaks takes an
admission slot in its client's and key's shares. Real servers on loopback, the real
``websockets`` client, connections from several loopback addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import websockets
from elevenlabs_support import Received, face_settings, read_until, read_until_closed, send, ws_url
from ops_support import HOLD, GatedEngine, live_server, tone_wav, wait_until
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.http.caller import key_id
from gateway.settings import Settings

KEY_A, KEY_B, ADMIN = "sk-agents-tenant-a-01234", "sk-agents-tenant-b-56789", "sk-agents-admin-00000"
PCM = {"output_format": "pcm_16000"}



def xi(key: str) -> dict[str, str]:
    return {"xi-api-key": key}


async def create_voice(client: httpx.AsyncClient, key: str, name: str, frequency: float) -> dict[str, Any]:
    response = await client.post(
        "/v1/audio/voices",
        data={"name": name},
        files={"audio_sample": ("clip.wav", tone_wav(4.0, frequency), "audio/wav")},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def not_found(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert detail["status"] == "voice_not_found", detail
    return detail  # type: ignore[no-any-return]


def same_answer(theirs: dict[str, Any], nobody: dict[str, Any], asked: str, invented: str) -> None:
    """The answer about another key's voice is the answer about a voice nobody created."""
    assert theirs == json.loads(json.dumps(nobody).replace(invented, asked)), (theirs, nobody)


def keyed(settings: Settings, **changes: Any) -> Settings:
    return face_settings(settings, api_keys=(KEY_A, KEY_B), admin_api_keys=(ADMIN,), **changes)


async def say(
    url: str, text: str, *, header_key: str | None = None, first_key: str | None = None, local: str = "127.0.0.1"
) -> Received:
    """A stream-input socket from ``local``: its key in the handshake or the first message,
    ``text``, the end of input; everything the server sent, up to its close."""
    received = Received()
    headers = xi(header_key) if header_key else {}
    async with websockets.connect(url, additional_headers=headers, local_addr=(local, 0)) as ws:
        first: dict[str, Any] = {"text": " "}
        if first_key:
            first["xi_api_key"] = first_key
        # a refused socket may be closed before these arrive; what it sent is still read
        with contextlib.suppress(websockets.ConnectionClosed):
            await send(ws, **first)
            await send(ws, text=text, flush=True)
            await send(ws, text="")
        await read_until_closed(ws, received)
    return received


def spoken(received: Received) -> Received:
    assert received.close_code == 1000 and received.audio(), received.messages
    return received


async def test_another_keys_voice_is_unknown_on_the_rest_routes(settings: Settings) -> None:
    engine = FakeEngine()
    with live_server(keyed(settings), engine, guarded=True) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            voice = await create_voice(client, KEY_A, "narrator", 220)
            invented = "voice_" + "0" * 24

            def listed(response: httpx.Response) -> set[str]:
                assert response.status_code == 200, response.text
                voices = response.json()["voices"]
                return {n for v in voices for n in (v["name"], v["voice_id"], *v["aliases"])}

            assert {"narrator", voice["id"]} <= listed(await client.get("/v1/voices", headers=xi(KEY_A)))
            assert {"narrator", voice["id"]} <= listed(await client.get("/v1/voices", headers=xi(ADMIN)))
            theirs_listed = listed(await client.get("/v1/voices", headers=xi(KEY_B)))
            assert "narrator" not in theirs_listed and voice["id"] not in theirs_listed and "alloy" in theirs_listed

            for asked in (voice["id"], "narrator", "Narrator"):
                same_answer(
                    not_found(await client.get(f"/v1/voices/{asked}", headers=xi(KEY_B))),
                    not_found(await client.get(f"/v1/voices/{invented}", headers=xi(KEY_B))),
                    asked,
                    invented,
                )
                for route in ("", "/stream", "/with-timestamps", "/stream/with-timestamps"):
                    spoken = await client.post(
                        f"/v1/text-to-speech/{asked}{route}", params=PCM, json={"text": "Hi."}, headers=xi(KEY_B)
                    )
                    nobody = await client.post(
                        f"/v1/text-to-speech/{invented}{route}", params=PCM, json={"text": "Hi."}, headers=xi(KEY_B)
                    )
                    same_answer(not_found(spoken), not_found(nobody), asked, invented)
            assert not any(job.voice.name == "narrator" for job in engine.jobs)  # B never reached the engine

            # the owner and an admin key use it
            assert (await client.get(f"/v1/voices/{voice['id']}", headers=xi(KEY_A))).json()["category"] == "cloned"
            for key in (KEY_A, ADMIN):
                ok = await client.post("/v1/text-to-speech/narrator", params=PCM, json={"text": "Hi."}, headers=xi(key))
                assert ok.status_code == 200 and ok.content, ok.text
            assert engine.jobs[-1].voice.name == "narrator"


async def test_sockets_see_their_keys_voices_whichever_way_the_key_came(settings: Settings) -> None:
    engine = FakeEngine()
    with live_server(keyed(settings), engine, guarded=True) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            await create_voice(client, KEY_A, "narrator", 220)
            await create_voice(client, KEY_B, "narrator", 330)  # B's own voice of the same name
            a_only = await create_voice(client, KEY_A, "a-only", 440)
            heard = {}
            for key in (KEY_A, KEY_B):  # the REST route names each key's own "narrator"
                ok = await client.post("/v1/text-to-speech/narrator", params=PCM, json={"text": "Hi."}, headers=xi(key))
                assert ok.status_code == 200, ok.text
                heard[key] = engine.jobs[-1].voice.key
            assert heard[KEY_A] != heard[KEY_B]

        def voice_spoken(received: Received) -> str:
            """The voice (content key) of the socket's engine job."""
            spoken(received)
            return engine.jobs[-1].voice.key

        text = "Hello from a socket."
        narrator = ws_url(live.base_url, "narrator", **PCM)
        for key in (KEY_A, KEY_B):
            # the key in the handshake, or in the first message: the same voice as on REST
            assert voice_spoken(await say(narrator, text, header_key=key)) == heard[key]
            assert voice_spoken(await say(narrator, text, first_key=key)) == heard[key]
        spoken(await say(ws_url(live.base_url, a_only["id"], **PCM), text, first_key=ADMIN))

        # B asks for A's voice (by id or name), on either socket, either way: an unknown voice
        jobs = len(engine.jobs)
        for voice in (a_only["id"], "a-only"):
            for multi in (False, True):
                url = ws_url(live.base_url, voice, multi=multi, **PCM)
                for refused in (await say(url, text, header_key=KEY_B), await say(url, text, first_key=KEY_B)):
                    assert refused.close_code == 1008, refused.messages
                    (error,) = refused.errors()
                    assert error["error"] == "voice_not_found" and error["code"] == 1008, error
                    assert not refused.audio()
        assert len(engine.jobs) == jobs

        # without a key the voice is not even looked up: a missing key is what it hears about
        for voice in ("a-only", "no-such-voice"):
            received = await say(ws_url(live.base_url, voice, **PCM), "No key.")
            assert received.close_code == 1008 and [e["error"] for e in received.errors()] == ["invalid_api_key"]


async def hold_a_chunk(url: str, *, first_key: str | None = None, local: str = "127.0.0.1") -> Any:
    """A stream-input socket whose one chunk is held by the engine (its slot stays taken)."""
    ws = await websockets.connect(url, local_addr=(local, 0))
    first: dict[str, Any] = {"text": " "}
    if first_key:
        first["xi_api_key"] = first_key
    await send(ws, **first)
    await send(ws, text=f"{HOLD} this sentence.", flush=True)
    return ws


async def refused_chunk(url: str, *, first_key: str | None = None, local: str = "127.0.0.1") -> dict[str, Any]:
    """A stream-input socket whose chunk admission refuses: its error, then a 1013 close."""
    received = await say(url, "One sentence too many.", first_key=first_key, local=local)
    assert received.close_code == 1013 and not received.audio(), received.messages
    (error,) = received.errors()
    assert error["code"] == 1013, error
    return error


async def test_a_socket_authenticated_by_its_first_message_takes_its_keys_share(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    # a key: 1 in flight, none waiting; clients unlimited, so only the key share can refuse
    config = keyed(settings, max_in_flight=2, max_queued=0, max_key_share=0.5, max_client_share=1.0)
    with capture_logs() as logs, live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        url = ws_url(live.base_url, **PCM)
        held = await hold_a_chunk(url, first_key=KEY_A)  # no key in the handshake
        try:
            assert await asyncio.to_thread(wait_until, lambda: admission.held_by("key", key_id(KEY_A.encode())) == (1, 0), 10)
            error = await refused_chunk(url, first_key=KEY_A)
            assert error["error"] == "key_concurrency_limit" and "max_key_share" in error["message"], error
            # key B (first message too) still has its share: it is spoken at once
            spoken(await say(url, "My own share.", first_key=KEY_B))
            assert admission.rejected_by["key"] == 1
        finally:
            await held.close()
        assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 0, 10)
    contexts = [e for e in logs if e["event"] == "tts_context"]
    refused = [e for e in contexts if e["outcome"] == "rejected"]
    assert len(refused) == 1 and refused[0]["limit"] == "key" and refused[0]["key_id"] == key_id(KEY_A.encode())
    assert {e["key_id"] for e in contexts} == {key_id(KEY_A.encode()), key_id(KEY_B.encode())}
    assert all(e.get("key_id") for e in logs if e["event"] == "websocket")
    assert not any(KEY_A in str(e) or KEY_B in str(e) for e in logs)  # ids, never the keys


async def test_the_per_client_share_applies_to_socket_chunks(settings: Settings) -> None:
    engine = GatedEngine(hold_after=0)
    # a client: 1 in flight, none waiting
    config = face_settings(settings, max_in_flight=4, max_queued=0, max_client_share=0.25)
    with capture_logs() as logs, live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        url = ws_url(live.base_url, **PCM)
        held = await hold_a_chunk(url, local="127.0.0.2")
        try:
            assert await asyncio.to_thread(wait_until, lambda: admission.held_by("client", "127.0.0.2") == (1, 0), 10)
            # the same address: refused on stream-input (1013), on a multi-stream context (its
            # error and isFinal; the socket stays open), and on REST (429), naming the limit
            error = await refused_chunk(url, local="127.0.0.2")
            assert error["error"] == "client_concurrency_limit" and "max_client_share" in error["message"], error
            async with websockets.connect(ws_url(live.base_url, multi=True, **PCM), local_addr=("127.0.0.2", 0)) as ws:
                received = Received()
                await send(ws, text="A context too many.", context_id="c1", flush=True)
                failed = await read_until(ws, received, lambda m: "error" in m)
                assert failed["error"] == "client_concurrency_limit" and failed["contextId"] == "c1", failed
                await read_until(ws, received, lambda m: m.get("isFinal") is True and m.get("contextId") == "c1")
                await send(ws, close_socket=True)
                await read_until_closed(ws, received)
                assert received.close_code == 1000, received.messages
            async with httpx.AsyncClient(
                base_url=live.base_url, timeout=30, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
            ) as client:
                rest = await client.post("/v1/text-to-speech/alloy", params=PCM, json={"text": "Over REST."})
                assert rest.status_code == 429 and rest.json()["detail"]["status"] == "client_concurrency_limit"
                assert int(rest.headers["retry-after"]) >= 1
            # another address is spoken at once
            spoken(await say(url, "Another client.", local="127.0.0.3"))
            assert admission.rejected_by["client"] == 3
        finally:
            await held.close()
        assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 0, 10)
    refused = [e for e in logs if e["event"] == "tts_context" and e["outcome"] == "rejected"]
    assert len(refused) == 2 and all(e["limit"] == "client" and e["client"] == "127.0.0.2" for e in refused), refused


async def test_without_a_client_share_one_address_holds_many_socket_chunks(settings: Settings) -> None:
    """``--max-client-share 1`` (what the benchmark servers run with): one address's sockets
    are limited by the server alone."""
    engine = GatedEngine(hold_after=0)
    config = face_settings(settings, max_in_flight=3, max_queued=0, max_client_share=1.0)
    with live_server(config, engine, guarded=True) as live:
        admission = live.services.admission
        url = ws_url(live.base_url, **PCM)
        sockets = [await hold_a_chunk(url) for _ in range(3)]
        try:
            assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 3, 10)
            error = await refused_chunk(url)
            assert error["error"] == "server_overloaded", error
        finally:
            for ws in sockets:
                await ws.close()
        assert await asyncio.to_thread(wait_until, lambda: admission.in_flight == 0, 10)
