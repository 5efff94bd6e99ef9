"""LiveKit Agents' ElevenLabs plugin, unchanged, pointed at the gateway with its ``base_url``:
``tts.stream()`` (the multi-stream-input WebSocket) with text pushed as an LLM writes it, audio
frames and timed transcripts out, in its default mp3 and in PCM; ``tts.synthesize()`` (the
REST stream route); ``list_voices()``; and ``aclose()`` mid-sentence, which closes the context:
the gateway cancels the engine job and frees its slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from livekit.agents import APIConnectOptions
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from livekit.plugins import elevenlabs

from agents_support import API_KEY, VOICE, agent_server, assert_cancelled_and_freed
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from ops_support import HOLD, GatedEngine
from tls_support import make_tls_files

TOKENS = ["Hello from ", "LiveKit. ", "This reply is written ", "token by token ", "by a language model."]
CONNECT = APIConnectOptions(max_retry=0, timeout=10)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def plugin(base_url: str, session: aiohttp.ClientSession, **options: object) -> elevenlabs.TTS:
    return elevenlabs.TTS(api_key=API_KEY, base_url=f"{base_url}/v1", voice_id=VOICE, http_session=session, **options)  # type: ignore[arg-type]


async def speak_streamed(tts: elevenlabs.TTS, tokens: list[str]) -> tuple[float, list]:
    """Push the tokens one at a time, end the input, and collect (seconds of audio, timed words)."""
    stream = tts.stream(conn_options=CONNECT)
    seconds, timed = 0.0, []
    async with stream:
        for token in tokens:
            stream.push_text(token)
            await asyncio.sleep(0.02)
        stream.end_input()
        async for event in stream:
            frame = event.frame
            assert (frame.sample_rate, frame.num_channels) == (tts.sample_rate, 1)
            seconds += frame.samples_per_channel / frame.sample_rate
            timed += frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])
    return seconds, timed


@pytest.mark.parametrize("encoding", ["mp3_22050_32", "pcm_24000"])
async def test_stream_gives_audio_and_timed_words(settings: Settings, session, encoding: str) -> None:
    with agent_server(settings, FakeEngine(piece_delay_s=0.005)) as live:
        tts = plugin(live.base_url, session, encoding=encoding)
        try:
            seconds, timed = await speak_streamed(tts, TOKENS)
        finally:
            await tts.aclose()
        assert seconds > 1
        text = "".join(TOKENS)
        assert "".join(timed).split() == text.split()  # TimedString is a str
        for word in timed:
            assert 0 <= word.start_time <= word.end_time <= seconds + 0.05, word
        assert live.engine.cancelled == [] and live.services.admission.in_flight == 0


async def test_synthesize_and_voices(settings: Settings, session) -> None:
    with agent_server(settings, FakeEngine(piece_delay_s=0.005)) as live:
        tts = plugin(live.base_url, session)  # default encoding: mp3_22050_32 over REST
        try:
            frame = await tts.synthesize("One request, the whole text at once.", conn_options=CONNECT).collect()
            assert frame.sample_rate == 22050 and frame.samples_per_channel / frame.sample_rate > 0.5
            voices = await tts.list_voices()
            assert voices and all(voice.id and voice.name and voice.category for voice in voices)
        finally:
            await tts.aclose()


async def test_aclose_mid_sentence_cancels_the_engine_job(settings: Settings, session) -> None:
    engine = GatedEngine(hold_after=2, piece_delay_s=0.01)
    with agent_server(settings, engine) as live:
        tts = plugin(live.base_url, session, encoding="pcm_24000")
        try:
            stream = tts.stream(conn_options=CONNECT)
            stream.push_text(f"{HOLD} this first sentence goes to the engine at once. ")
            stream.push_text("And this second one is cut off in the mid")
            heard = 0.0
            async for event in stream:  # audio of the first sentence is playing...
                heard += event.frame.samples_per_channel / event.frame.sample_rate
                if heard > 0.1:
                    break
            assert await asyncio.to_thread(engine.holding.wait, 10)
            await stream.aclose()  # ...when the user barges in
            await asyncio.to_thread(assert_cancelled_and_freed, live, HOLD)
            # the shared connection still serves the next reply
            seconds, _ = await speak_streamed(tts, ["A new reply after the interruption."])
            assert seconds > 0.3
        finally:
            await tts.aclose()


async def test_over_https_and_wss(settings: Settings, tmp_path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    connector = aiohttp.TCPConnector(ssl=tls.client_context())
    async with aiohttp.ClientSession(connector=connector) as trusting:
        with agent_server(settings, FakeEngine(piece_delay_s=0.005), tls=tls) as live:
            assert live.base_url.startswith("https://")
            tts = plugin(live.base_url, trusting, encoding="pcm_24000")
            try:
                seconds, timed = await speak_streamed(tts, ["Spoken over ", "TLS, both ways."])
                assert seconds > 0.3 and timed
                frame = await tts.synthesize("And over https.", conn_options=CONNECT).collect()
                assert frame.samples_per_channel > 0
            finally:
                await tts.aclose()
