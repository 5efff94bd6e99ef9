"""The stream-input and multi-stream-input WebSockets on a real server on loopback (fake
engine), driven by a plain ``websockets`` client: every message type, audio that starts while
text is still arriving, timings that add up to the audio, barge-in that cancels the engine job
and returns the slot, graceful ends, one log line per context."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from decoded_audio import decode_output
from elevenlabs_support import (
    Received,
    face_settings,
    job_samples,
    read_until,
    read_until_closed,
    send,
    ws_url,
)
from ops_support import HOLD, GatedEngine, live_server, wait_until
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.http.elevenlabs.face import face_of
from gateway.models.families import TURBO
from gateway.settings import Settings

SENTENCES = (
    "Hello there, this is a voice agent speaking while its language model is still writing. "
    "Every chunk goes to the engine as soon as it is cut, so the audio starts early. "
    "And the last words arrive at the very end."
)


@pytest.fixture
def live(settings: Settings):
    with live_server(face_settings(settings), FakeEngine(piece_delay_s=0.002), guarded=True) as server:
        yield server


def spans_ms(alignments: list[dict]) -> list[int]:
    """What Pipecat adds to its clock per message: the last character's start + duration."""
    return [a["charStartTimesMs"][-1] + a["charDurationsMs"][-1] for a in alignments]


async def test_stream_input_from_first_word_to_the_close(live, settings: Settings) -> None:
    received = Received()
    async with websockets.connect(ws_url(live.base_url, output_format="pcm_16000", model_id="eleven_monolingual_v1")) as ws:
        await send(ws, text=" ", voice_settings={"stability": 0.5, "similarity_boost": 0.75},
                   generation_config={"chunk_length_schedule": [50, 120]}, xi_api_key=None)
        for word in SENTENCES.split(" "):
            await send(ws, text=word + " ")
        await send(ws, text="")
        await read_until_closed(ws, received)
    assert received.close_code == 1000
    assert received.finals() == [None] and received.messages[-1] == {"isFinal": True}
    assert all(set(m) == {"audio", "isFinal", "alignment", "normalizedAlignment"} for m in received.messages[:-1])
    request_id = ws.response.headers["x-request-id"]
    engine_samples = job_samples(live.engine, request_id)
    audio = decode_output(received.audio(), "pcm_16000")
    assert abs(audio.samples - engine_samples * 16000 / 24000) <= 2
    alignments = received.alignments()
    assert "".join("".join(a["chars"]) for a in alignments) == " " + SENTENCES.replace("  ", " ") + " "
    # each chunk's alignment is whole in one message and spans the chunk exactly: the sum of
    # the spans is the audio's length (what a client adding them up relies on)
    assert sum(spans_ms(alignments)) == pytest.approx(engine_samples / 24, abs=len(alignments))
    for a in alignments:
        assert len(a["chars"]) == len(a["charStartTimesMs"]) == len(a["charDurationsMs"])
        assert all(d >= 0 for d in a["charDurationsMs"]) and a["charStartTimesMs"] == sorted(a["charStartTimesMs"])
    assert len(received.alignments(key="normalizedAlignment")) == len(alignments)
    jobs = [job for job in live.engine.jobs if job.request_id.startswith(request_id)]
    assert len(jobs) >= 3 and all(job.model == "chatterbox" for job in jobs)
    assert jobs[0].params.exaggeration == pytest.approx(0.5) and jobs[0].params.cfg_weight == pytest.approx(0.5)


async def test_audio_starts_while_the_text_is_still_arriving(live) -> None:
    received = Received()
    async with websockets.connect(ws_url(live.base_url, output_format="pcm_24000")) as ws:
        await send(ws, text=" ", generation_config={"chunk_length_schedule": [50]})
        await send(ws, text="The first sentence is long enough to be cut by the schedule at once. ")
        # no more text, no flush, no end: the first chunk is already being spoken
        first = await read_until(ws, received, lambda m: bool(m.get("audio")), timeout_s=10)
        assert first["audio"]
        await send(ws, text="Then the rest.")
        await send(ws, text="")
        await read_until_closed(ws, received)
    assert received.close_code == 1000 and received.finals() == [None]


async def test_multi_stream_contexts_keepalives_flush_and_graceful_close(live) -> None:
    received = Received()
    url = ws_url(live.base_url, multi=True, output_format="ulaw_8000", auto_mode="true", sync_alignment="true",
                 enable_logging="true", apply_text_normalization="auto", inactivity_timeout=180)
    async with websockets.connect(url) as ws:
        await send(ws, text="")  # a keepalive before any context: nothing happens
        await send(ws, text=" ", context_id="a", voice_settings={"stability": 0.2})
        await send(ws, text=" ", context_id="b")
        await send(ws, text="Context a speaks first.", context_id="a")
        await send(ws, text="", context_id="a")  # a keepalive for a: not an end
        await send(ws, text="Context b speaks at the same time. ", context_id="b")
        await send(ws, context_id="a", flush=True)
        await send(ws, context_id="a", close_context=True)  # right after a flush: graceful
        await send(ws, text="", context_id="b", flush=True)
        await send(ws, context_id="b", close_context=True)
        await read_until(ws, received, lambda m: m.get("isFinal") and m.get("contextId") == "b")
        if "a" not in received.finals():
            await read_until(ws, received, lambda m: m.get("isFinal") and m.get("contextId") == "a")
        await send(ws, close_socket=True)
        await read_until_closed(ws, received)
    assert received.close_code == 1000
    assert sorted(received.finals()) == ["a", "b"]
    assert all(m.get("contextId") in ("a", "b") for m in received.messages)
    socket_id = ws.response.headers["x-request-id"]
    for context in ("a", "b"):
        audio = decode_output(received.audio(context), "ulaw_8000")
        assert abs(audio.samples - job_samples(live.engine, f"{socket_id}-{context}") / 3) <= 2
        assert "".join("".join(a["chars"]) for a in received.alignments(context)).strip().startswith("Context")
    assert not live.engine.cancelled  # both ended gracefully: spoken to the end
    assert live.engine.jobs[-2].params.exaggeration == pytest.approx(0.8) or live.engine.jobs[-1].params.exaggeration == pytest.approx(0.8)


async def test_barge_in_cancels_the_engine_job_and_returns_the_slot(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    received = Received()
    with capture_logs() as logs, live_server(face_settings(settings), engine, guarded=True) as server:
        async with websockets.connect(ws_url(server.base_url, multi=True, auto_mode="true")) as ws:
            socket_id = ws.response.headers["x-request-id"]
            await send(ws, text=" ", context_id="turn1")
            await send(ws, text=f"{HOLD} the first turn keeps talking and talking for a long while.", context_id="turn1")
            await read_until(ws, received, lambda m: bool(m.get("audio")))  # it is speaking
            assert await asyncio.to_thread(engine.holding.wait, 10)
            assert server.services.admission.in_flight == 1
            await send(ws, context_id="turn1", close_context=True)  # the user barges in
            await read_until(ws, received, lambda m: m.get("isFinal") is True)
            # isFinal comes after the job is cancelled and the slot is back
            assert f"{socket_id}-turn1-0" in engine.cancelled and f"{socket_id}-turn1-0" not in engine.completed
            assert server.services.admission.in_flight == 0
            # the same socket serves the next turn normally
            await send(ws, text="A new turn after the interruption.", context_id="turn2")
            await send(ws, context_id="turn2", flush=True)
            await send(ws, context_id="turn2", close_context=True)
            await read_until(ws, received, lambda m: m.get("isFinal") is True and m.get("contextId") == "turn2")
            assert received.audio("turn2")
            assert f"{socket_id}-turn2-0" in engine.completed
        face = face_of(server.app)
        assert await asyncio.to_thread(wait_until, lambda: face.open_sockets == face.open_contexts == 0, 5)
    lines = {line["context_id"]: line for line in logs if line["event"] == "tts_context"}
    assert lines["turn1"]["outcome"] == "interrupted" and lines["turn2"]["outcome"] == "ok"
    assert lines["turn2"]["first_audio_ms"] is not None and lines["turn2"]["audio_s"] > 0
    (socket_line,) = [line for line in logs if line["event"] == "websocket"]
    assert socket_line["contexts"] == 2 and socket_line["endpoint"] == "multi-stream-input"


async def test_a_second_close_cancels_a_context_that_was_closing_gracefully(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    received = Received()
    with live_server(face_settings(settings), engine, guarded=True) as server:
        async with websockets.connect(ws_url(server.base_url, multi=True)) as ws:
            socket_id = ws.response.headers["x-request-id"]
            await send(ws, text=f"{HOLD} a turn the language model finished writing, still being spoken.", context_id="x")
            await send(ws, context_id="x", flush=True)
            await send(ws, context_id="x", close_context=True)  # end of turn: graceful
            assert await asyncio.to_thread(engine.holding.wait, 10)
            assert server.services.admission.in_flight == 1  # still speaking
            await send(ws, context_id="x", close_context=True)  # then the user interrupts
            await read_until(ws, received, lambda m: m.get("isFinal") is True)
            assert f"{socket_id}-x-0" in engine.cancelled
            assert server.services.admission.in_flight == 0


async def test_a_client_that_leaves_mid_speech_stops_everything(settings: Settings) -> None:
    engine = GatedEngine(hold_after=1)
    with capture_logs() as logs, live_server(face_settings(settings), engine, guarded=True) as server:
        async with websockets.connect(ws_url(server.base_url)) as ws:
            socket_id = ws.response.headers["x-request-id"]
            await send(ws, text=f"{HOLD} this is said to nobody in the end.", flush=True)
            await ws.recv()
            assert await asyncio.to_thread(engine.holding.wait, 10)
        # the client closed the socket
        assert await asyncio.to_thread(wait_until, lambda: f"{socket_id}-0" in engine.cancelled, 5)
        assert await asyncio.to_thread(wait_until, lambda: server.services.admission.in_flight == 0, 5)
    (line,) = [e for e in logs if e["event"] == "tts_context"]
    assert line["outcome"] == "cancelled"


@pytest.mark.parametrize("output_format", ["mp3_44100_128", "opus_48000_32", "alaw_8000", "pcm_48000"])
async def test_each_context_is_one_valid_file_in_its_format(live, output_format: str) -> None:
    received = Received()
    async with websockets.connect(ws_url(live.base_url, output_format=output_format, auto_mode="true")) as ws:
        for sentence in ("One sentence. ", "Another sentence. ", "A third one."):
            await send(ws, text=sentence)
        await send(ws, text="")
        await read_until_closed(ws, received)
    audio = decode_output(received.audio(), output_format)
    engine_s = job_samples(live.engine, ws.response.headers["x-request-id"]) / 24_000
    assert audio.duration_s == pytest.approx(engine_s, abs=0.1)


async def test_sdk_style_trigger_on_every_message(live) -> None:
    """What the elevenlabs SDK's realtime helper sends: schedule [50], try_trigger on each."""
    received = Received()
    async with websockets.connect(ws_url(live.base_url, output_format="pcm_24000")) as ws:
        await send(ws, text=" ", try_trigger_generation=True, voice_settings=None, generation_config={"chunk_length_schedule": [50]})
        for piece in ("Hello, ", "this is ", "the software ", "development kit ", "sending text ", "in small pieces. ", "Done. "):
            await send(ws, text=piece, try_trigger_generation=True)
        await send(ws, text="")
        await read_until_closed(ws, received)
    assert received.close_code == 1000 and received.audio()
    jobs = [job for job in live.engine.jobs if job.request_id.startswith(ws.response.headers["x-request-id"])]
    assert len(jobs) >= 2


async def test_auto_mode_speaks_each_sentence_as_it_arrives_and_language_picks_the_family(live) -> None:
    received = Received()
    url = ws_url(live.base_url, multi=True, auto_mode="true", model_id="eleven_flash_v2_5", language_code="en")
    async with websockets.connect(url) as ws:
        for sentence in ("First one. ", "Second one. ", "Third one. "):
            await send(ws, text=sentence, context_id="c", flush=True)
        await send(ws, text="", context_id="c", flush=True)
        await send(ws, context_id="c", close_context=True)
        await read_until(ws, received, lambda m: m.get("isFinal") is True)
    jobs = [job for job in live.engine.jobs if job.request_id.startswith(ws.response.headers["x-request-id"])]
    assert [job.chunks for job in jobs] == [("First one.",), ("Second one.",), ("Third one.",)]
    assert all(job.model == TURBO for job in jobs)
