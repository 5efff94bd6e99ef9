"""The ElevenLabs REST face on a real server on loopback (fake engine), with plain httpx: every
route, every output format decoded by FFmpeg at its rate and length, timestamps consistent with
the audio, the voice settings reaching the engine, errors in ElevenLabs' shape."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from decoded_audio import decode_output
from elevenlabs_support import KEY, face_settings, fake_samples, job_samples
from ops_support import HOLD, GatedEngine, live_server, wait_until
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.models.families import MULTILINGUAL, ORIGINAL, TURBO
from gateway.settings import Settings

TEXT = "Hello there. This is the gateway speaking as ElevenLabs would."


def detail(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is ElevenLabs' error shape with this status (and code)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail"}, body
    assert body["detail"]["message"] and body["detail"]["status"]
    if code is not None:
        assert body["detail"]["status"] == code, body
    return body["detail"]


@pytest.fixture
def live(settings: Settings):
    with live_server(face_settings(settings), FakeEngine(piece_delay_s=0.002), guarded=True) as server:
        yield server


@pytest.mark.parametrize(
    "output_format", [None, "mp3_22050_32", "pcm_16000", "pcm_24000", "pcm_44100", "ulaw_8000", "alaw_8000", "opus_48000_64", "wav_8000"]
)
async def test_convert_in_every_format_decodes_at_its_rate_and_length(live, settings, output_format) -> None:
    query = {} if output_format is None else {"output_format": output_format}
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
        response = await client.post("/v1/text-to-speech/alloy", params=query, json={"text": TEXT})
    assert response.status_code == 200, response.text
    name = output_format or "mp3_44100_128"
    got = decode_output(response.content, name)
    rate = 48000 if name.startswith("opus") else int(name.split("_")[1])
    assert (got.sample_rate, got.channels) == (rate, 1)
    expected = fake_samples(TEXT, face_settings(settings)) / 24_000 * rate
    if name.split("_")[0] in ("pcm", "ulaw", "alaw", "wav"):
        assert abs(got.samples - expected) <= 2, (got.samples, expected)
        assert response.headers["content-type"].startswith("audio/")
    else:
        assert expected <= got.samples <= expected + 0.1 * rate


async def test_stream_route_streams_the_same_audio(live) -> None:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
        whole = await client.post("/v1/text-to-speech/alloy", params={"output_format": "pcm_24000"}, json={"text": TEXT, "seed": 3})
        pieces = []
        async with client.stream(
            "POST", "/v1/text-to-speech/alloy/stream", params={"output_format": "pcm_24000"}, json={"text": TEXT, "seed": 3}
        ) as response:
            assert response.status_code == 200
            async for data in response.aiter_raw():
                pieces.append(data)
    assert b"".join(pieces) == whole.content
    assert len(pieces) > 1


@pytest.mark.parametrize("output_format", ["pcm_16000", "ulaw_8000", "mp3_44100_128"])
async def test_with_timestamps_covers_every_character_up_to_the_audio_end(live, settings, output_format) -> None:
    text = "First sentence here. " * 20 + "And the last one, at the end."  # several chunks
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
        response = await client.post(
            "/v1/text-to-speech/alloy/with-timestamps", params={"output_format": output_format}, json={"text": text}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"audio_base64", "alignment", "normalized_alignment"}
    audio = decode_output(base64.b64decode(body["audio_base64"]), output_format)
    alignment = body["alignment"]
    assert "".join(alignment["characters"]) == text
    starts, ends = alignment["character_start_times_seconds"], alignment["character_end_times_seconds"]
    assert len(starts) == len(ends) == len(text)
    assert all(0 <= s <= e for s, e in zip(starts, ends))
    assert all(a <= b for a, b in zip(starts, starts[1:]))
    # exact: the last character ends where the engine's audio ends (the decoded file may hold
    # codec padding on top)
    engine_seconds = job_samples(live.engine, response.headers["x-request-id"]) / 24_000
    assert ends[-1] == pytest.approx(engine_seconds, abs=1e-3)
    assert audio.duration_s >= ends[-1] - 0.002
    normalized = body["normalized_alignment"]
    assert normalized["characters"] and normalized["character_end_times_seconds"][-1] == pytest.approx(ends[-1], abs=1e-3)
    jobs = [job for job in live.engine.jobs if job.request_id.startswith(response.headers["x-request-id"])]
    assert len(jobs) > 1  # one engine job per chunk: the boundaries are exact


async def test_stream_with_timestamps_is_ndjson_with_absolute_times(live) -> None:
    text = "One sentence. " * 30
    lines = []
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
        async with client.stream(
            "POST", "/v1/text-to-speech/alloy/stream/with-timestamps", params={"output_format": "pcm_24000"}, json={"text": text}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            async for line in response.aiter_lines():
                if line:
                    lines.append(json.loads(line))
    assert all(set(line) == {"audio_base64", "alignment", "normalized_alignment"} for line in lines)
    audio = b"".join(base64.b64decode(line["audio_base64"]) for line in lines)
    chars, ends = [], []
    for line in lines:
        if line["alignment"]:
            chars += line["alignment"]["characters"]
            ends += line["alignment"]["character_end_times_seconds"]
    assert "".join(chars) == text
    assert all(a <= b for a, b in zip(ends, ends[1:]))  # absolute: never back to zero
    assert ends[-1] == pytest.approx(len(audio) / 2 / 24_000, abs=1e-3)


async def test_voices_in_elevenlabs_shape(live) -> None:
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        listed = (await client.get("/v1/voices")).json()["voices"]
        by_name = {voice["name"]: voice for voice in listed}
        assert {"voice_id", "name", "category"} <= set(by_name["alloy"] if "alloy" in by_name else listed[0])
        alloy = next(voice for voice in listed if "alloy" in voice["aliases"] or voice["name"] == "alloy")
        assert alloy["category"] == "premade"
        for key in (alloy["voice_id"], "alloy"):
            one = await client.get(f"/v1/voices/{key}")
            assert one.status_code == 200 and one.json()["voice_id"] == alloy["voice_id"]
        detail(await client.get("/v1/voices/no-such-voice"), 404, "voice_not_found")
        # the voice id of the listing works for speech
        spoken = await client.post(f"/v1/text-to-speech/{alloy['voice_id']}", json={"text": "Hi."})
        assert spoken.status_code == 200


async def test_voice_settings_seed_and_model_reach_the_engine(live) -> None:
    body = {
        "text": "Settings test.",
        "model_id": "eleven_multilingual_v2",
        "language_code": "de",
        "seed": 42,
        "voice_settings": {"stability": 0.2, "similarity_boost": 0.9, "style": 0.1, "use_speaker_boost": None, "speed": None},
        "pronunciation_dictionary_locators": [], "previous_text": None, "apply_text_normalization": "auto",
    }
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
        response = await client.post("/v1/text-to-speech/alloy", params={"enable_logging": "true", "optimize_streaming_latency": 3}, json=body)
        assert response.status_code == 200, response.text
        job = live.engine.jobs[-1]
        assert (job.model, job.language, job.params.seed) == (MULTILINGUAL, "de", 42)
        assert job.params.exaggeration == pytest.approx(0.9) and job.params.cfg_weight == pytest.approx(0.6)
        # German on a flash id reaches the multilingual family too; English stays on Turbo
        for model_id, language, family in (("eleven_flash_v2_5", "de", MULTILINGUAL), ("eleven_flash_v2_5", None, TURBO), (None, None, ORIGINAL)):
            sent = {"text": "Hallo." if language else "Hello.", "model_id": model_id, "language_code": language}
            assert (await client.post("/v1/text-to-speech/alloy", json=sent)).status_code == 200
            assert live.engine.jobs[-1].model == family


async def test_client_errors_are_elevenlabs_shaped(live) -> None:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
        post = client.post
        detail(await post("/v1/text-to-speech/alloy", content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json")
        detail(await post("/v1/text-to-speech/alloy", json=["a list"]), 400)
        assert detail(await post("/v1/text-to-speech/alloy", json={}), 400)["param"] == "text"
        assert detail(await post("/v1/text-to-speech/alloy", json={"text": "   "}), 400)["param"] == "text"
        assert detail(await post("/v1/text-to-speech/alloy", json={"text": "x" * 5001}), 400)["param"] == "text"
        assert detail(await post("/v1/text-to-speech/alloy", json={"text": "Hi", "seed": -1}), 400)["param"] == "seed"
        settings = {"text": "Hi", "voice_settings": {"stability": 3}}
        assert detail(await post("/v1/text-to-speech/alloy", json=settings), 400)["param"] == "voice_settings"
        assert detail(await post("/v1/text-to-speech/alloy", params={"output_format": "mp3_1_2"}, json={"text": "Hi"}), 400)["param"] == "output_format"
        assert detail(await post("/v1/text-to-speech/nobody", json={"text": "Hi"}), 404, "voice_not_found")["param"] == "voice_id"
        detail(await post("/v1/text-to-speech/alloy", json={"text": "Hi", "model_id": "gpt-5-tts"}), 404, "model_not_found")
        detail(await post("/v1/text-to-speech/alloy", json={"text": "Hi", "model_id": "eleven_monolingual_v1", "language_code": "xx"}), 400, "unsupported_language")
        detail(await post("/v1/text-to-speech/alloy/with-timestamps", content=b"text", headers={"content-type": "text/plain"}), 400, "unsupported_media_type")
        detail(await client.get("/v1/text-to-speech/alloy/stream-input"), 426, "upgrade_required")
        # the server is unaffected
        assert (await post("/v1/text-to-speech/alloy", json={"text": "Still fine."})).status_code == 200


async def test_keys_by_xi_api_key_or_bearer(settings: Settings) -> None:
    with live_server(face_settings(settings, api_keys=(KEY,)), FakeEngine(), guarded=True) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            detail(await client.get("/v1/voices"), 401, "invalid_api_key")
            detail(await client.get("/v1/voices", headers={"xi-api-key": "wrong"}), 401, "invalid_api_key")
            assert (await client.get("/v1/voices", headers={"xi-api-key": KEY})).status_code == 200
            assert (await client.get("/v1/voices", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
            # and xi-api-key opens the OpenAI face too: one set of keys
            assert (await client.get("/v1/models", headers={"xi-api-key": KEY})).status_code == 200


async def test_overload_is_429_with_retry_after_and_a_leaving_client_frees_its_slot(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    config = face_settings(settings, max_in_flight=1, max_queued=0)
    with live_server(config, engine, guarded=True) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            holding = asyncio.create_task(
                client.post("/v1/text-to-speech/alloy/with-timestamps", json={"text": f"{HOLD} this one. " + "More words to speak. " * 4})
            )
            assert await asyncio.to_thread(engine.holding.wait, 10)
            refused = await client.post("/v1/text-to-speech/alloy", json={"text": "No room."})
            assert detail(refused, 429, "server_overloaded") and refused.headers["retry-after"]
            holding.cancel()  # the client leaves mid-request: the engine job goes, the slot comes back
            with pytest.raises(asyncio.CancelledError):
                await holding
            assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 0, 5)
            assert any(job_id.endswith("-0") for job_id in engine.cancelled)
            assert (await client.post("/v1/text-to-speech/alloy", json={"text": "Room again."})).status_code == 200


async def test_one_log_line_per_request_with_the_speech_fields(live) -> None:
    with capture_logs() as logs:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            await client.post("/v1/text-to-speech/alloy/stream", params={"output_format": "ulaw_8000"}, json={"text": TEXT})
            await client.post("/v1/text-to-speech/alloy/with-timestamps", json={"text": TEXT})
    lines = [e for e in logs if e["event"] == "request" and e["path"].startswith("/v1/text-to-speech/")]
    assert [line["format"] for line in lines] == ["ulaw_8000", "mp3_44100_128"]
    assert all(line["outcome"] == "ok" and line["audio_s"] > 0 and line["model"] for line in lines)
    metrics = httpx.get(f"{live.base_url}/metrics").text
    assert 'outcome="ok",route="/v1/text-to-speech/{id}/stream"' in metrics
    assert 'outcome="ok",route="/v1/text-to-speech/{id}/with-timestamps"' in metrics
