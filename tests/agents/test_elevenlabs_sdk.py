"""The official ``elevenlabs`` Python SDK, unchanged, against the gateway on loopback over TLS
(its realtime helper only speaks ``wss://``): text-to-speech convert and stream, both
with-timestamps routes, the voices, the realtime (stream-input) helper with a certificate made
in the test, the xi-api-key header, and errors as the SDK raises them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from elevenlabs import VoiceSettings
from elevenlabs.client import ElevenLabs
from elevenlabs.core.api_error import ApiError

from agents_support import API_KEY, VOICE, agent_server, assert_word_times, pcm_seconds
from decoded_audio import decode_output
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from tls_support import TlsFiles, make_tls_files

TEXT = "Hello from a self-hosted voice. It speaks every word you send."


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def live(settings: Settings, tls_files: TlsFiles) -> Iterator:
    with agent_server(settings, FakeEngine(piece_delay_s=0.005), tls=tls_files) as live:
        yield live


@pytest.fixture
def client(live, tls_files: TlsFiles) -> Iterator[ElevenLabs]:
    # REST goes through httpx: trust the test authority there; the realtime helper's
    # websockets client reads SSL_CERT_FILE (set in its own test).
    with httpx.Client(verify=tls_files.client_context(), timeout=30) as http:
        yield ElevenLabs(api_key=API_KEY, base_url=live.base_url, httpx_client=http)


def words_of(characters: list[str], starts: list[float]) -> list[tuple[str, float]]:
    """Words and their start times from character timings, split at spaces (as the agent
    frameworks do)."""
    words: list[tuple[str, float]] = []
    current, start = "", 0.0
    for char, t in zip(characters, starts):
        if char == " ":
            if current:
                words.append((current, start))
            current = ""
        else:
            if not current:
                start = t
            current += char
    if current:
        words.append((current, start))
    return words


def test_convert_defaults_to_mp3_44100(client: ElevenLabs, live) -> None:
    audio = b"".join(client.text_to_speech.convert(VOICE, text=TEXT))
    decoded = decode_output(audio, "mp3_44100_128")
    assert (decoded.codec, decoded.sample_rate, decoded.channels) == ("mp3", 44100, 1)
    assert decoded.duration_s > 0.5


@pytest.mark.parametrize(
    ("output_format", "codec", "rate"),
    [("pcm_16000", "pcm_s16le", 16000), ("mp3_22050_32", "mp3", 22050), ("opus_48000_64", "opus", 48000)],
)
def test_stream_in_the_requested_format(client: ElevenLabs, output_format: str, codec: str, rate: int) -> None:
    pieces = client.text_to_speech.stream(
        VOICE,
        text=TEXT,
        model_id="eleven_flash_v2_5",
        output_format=output_format,
        voice_settings=VoiceSettings(stability=0.4, similarity_boost=0.75, style=0.1, speed=1.0),
        seed=7,
    )
    decoded = decode_output(b"".join(pieces), output_format)
    assert (decoded.codec, decoded.sample_rate, decoded.channels) == (codec, rate, 1)
    assert decoded.duration_s > 0.5


def test_convert_with_timestamps(client: ElevenLabs) -> None:
    result = client.text_to_speech.convert_with_timestamps(VOICE, text=TEXT, output_format="pcm_24000")
    audio_s = pcm_seconds(base64.b64decode(result.audio_base_64), 24000)
    for alignment in (result.alignment, result.normalized_alignment):
        assert alignment is not None
        assert "".join(alignment.characters) == TEXT
        starts, ends = alignment.character_start_times_seconds, alignment.character_end_times_seconds
        assert len(starts) == len(ends) == len(alignment.characters)
        assert all(s <= e for s, e in zip(starts, ends))
        assert ends[-1] <= audio_s + 0.05
        assert_word_times(words_of(alignment.characters, starts), TEXT, audio_s)


def test_stream_with_timestamps_counts_from_the_start_of_the_audio(client: ElevenLabs) -> None:
    chunks = list(client.text_to_speech.stream_with_timestamps(VOICE, text=TEXT, output_format="pcm_24000"))
    assert len(chunks) > 1
    audio = b"".join(base64.b64decode(chunk.audio_base_64) for chunk in chunks if chunk.audio_base_64)
    characters: list[str] = []
    starts: list[float] = []
    for chunk in chunks:
        if chunk.alignment is not None:
            characters += chunk.alignment.characters
            starts += chunk.alignment.character_start_times_seconds
    assert "".join(characters) == TEXT
    assert_word_times(words_of(characters, starts), TEXT, pcm_seconds(audio, 24000))


def test_voices(client: ElevenLabs) -> None:
    voices = client.voices.get_all().voices
    assert voices and all(voice.voice_id and voice.name and voice.category in ("premade", "cloned") for voice in voices)
    # the voice the other tests call "alloy" is listed, under that name or as an alias
    card = next(v for v in voices if VOICE == v.name or VOICE in (getattr(v, "aliases", None) or []))
    one = client.voices.get(card.voice_id)
    assert (one.voice_id, one.name) == (card.voice_id, card.name)
    # every listed id speaks
    for voice in voices:
        assert b"".join(client.text_to_speech.convert(voice.voice_id, text="Hi.", output_format="pcm_24000"))


def test_errors_as_the_sdk_raises_them(client: ElevenLabs, live, tls_files: TlsFiles) -> None:
    with pytest.raises(ApiError) as missing:
        client.voices.get("no-such-voice")
    assert missing.value.status_code == 404
    with pytest.raises(ApiError) as bad_voice:
        b"".join(client.text_to_speech.convert("no-such-voice", text=TEXT))
    assert 400 <= bad_voice.value.status_code < 500
    with pytest.raises(ApiError) as bad_format:
        b"".join(client.text_to_speech.convert(VOICE, text=TEXT, output_format="mp3_1_2"))
    assert bad_format.value.status_code in (400, 422)
    with httpx.Client(verify=tls_files.client_context()) as http:
        wrong_key = ElevenLabs(api_key="not-the-key", base_url=live.base_url, httpx_client=http)
        with pytest.raises(ApiError) as unauthorized:
            wrong_key.voices.get_all()
    assert unauthorized.value.status_code == 401


def test_realtime_helper_over_wss(client: ElevenLabs, live, tls_files: TlsFiles, monkeypatch) -> None:
    # convert_realtime always dials wss://; its websockets client trusts what SSL_CERT_FILE names.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca_file))

    def llm_tokens() -> Iterator[str]:
        yield from ["Hello", " there", ",", " this", " is", " streamed", " word", " by", " word", "."]

    audio = b"".join(client.text_to_speech.convert_realtime(VOICE, text=llm_tokens(), model_id="eleven_turbo_v2_5"))
    decoded = decode_output(audio, "mp3_44100_128")  # the helper's default output_format
    assert (decoded.codec, decoded.sample_rate) == ("mp3", 44100)
    assert decoded.duration_s > 0.5
    assert live.services.admission.in_flight == 0
