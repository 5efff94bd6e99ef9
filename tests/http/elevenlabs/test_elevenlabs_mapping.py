"""The translation tables of the ElevenLabs face: model ids, output_format names, voice settings."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError, ModelNotFoundError
from gateway.http.elevenlabs.controls import speech_request
from gateway.http.elevenlabs.model_ids import ElevenLabsModels
from gateway.http.elevenlabs.output_formats import parse_output_format
from gateway.http.elevenlabs.protocol import VoiceSettings
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO
from gateway.speech.model_names import ModelNames

ALL = (ORIGINAL, TURBO, MULTILINGUAL)


@pytest.mark.parametrize(
    ("loaded", "model_id", "language", "expected"),
    [
        (ALL, "eleven_flash_v2_5", None, TURBO),
        (ALL, "eleven_turbo_v2_5", "en", TURBO),
        (ALL, "eleven_flash_v2_5", "de", MULTILINGUAL),  # v2.5 is multilingual: German moves
        (ALL, "eleven_turbo_v2", "de", TURBO),  # English-only at ElevenLabs too: the 400 follows
        (ALL, "eleven_multilingual_v2", None, MULTILINGUAL),
        (ALL, "eleven_v3", "fr", MULTILINGUAL),
        (ALL, "eleven_monolingual_v1", None, ORIGINAL),
        (ALL, "ELEVEN_English_STS_v2", None, ORIGINAL),
        (ALL, None, None, ORIGINAL),  # absent: the first loaded model
        (ALL, None, "ja", MULTILINGUAL),
        ((ORIGINAL,), "eleven_flash_v2_5", None, ORIGINAL),  # only what is loaded
        ((ORIGINAL,), "eleven_multilingual_v2", None, ORIGINAL),
        ((TURBO,), "eleven_v3", None, TURBO),
        (ALL, "chatterbox-turbo", "de", TURBO),  # our own names as on the OpenAI route
        (ALL, "tts-1", None, TURBO),
    ],
)
def test_model_ids_map_to_loaded_families(loaded, model_id, language, expected) -> None:
    models = ElevenLabsModels(ModelNames(loaded))
    assert models.resolve(model_id, language).id == expected


def test_overrides_win_and_unknown_ids_are_404() -> None:
    models = ElevenLabsModels(ModelNames(ALL), ["eleven_flash_v2_5=chatterbox", "my-agent-voice=chatterbox-multilingual"])
    assert models.resolve("eleven_flash_v2_5").id == ORIGINAL
    assert models.resolve("My-Agent-Voice").id == MULTILINGUAL
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve("gpt-5-tts")
    assert info.value.param == "model_id" and "eleven_" in info.value.message
    with pytest.raises(ValueError):
        ElevenLabsModels(ModelNames((ORIGINAL,)), ["eleven_flash_v2_5=chatterbox-turbo"])  # not loaded


@pytest.mark.parametrize(
    ("name", "container", "codec", "rate", "bit_rate", "media"),
    [
        (None, "mp3", "libmp3lame", 44100, 128_000, "audio/mpeg"),
        ("mp3_22050_32", "mp3", "libmp3lame", 22050, 32_000, "audio/mpeg"),
        ("pcm_16000", "s16le", "pcm_s16le", 16000, None, "audio/pcm"),
        ("PCM_44100", "s16le", "pcm_s16le", 44100, None, "audio/pcm"),
        ("pcm_12345", "s16le", "pcm_s16le", 12345, None, "audio/pcm"),
        ("ulaw_8000", "mulaw", "pcm_mulaw", 8000, None, "audio/basic"),
        ("alaw_8000", "alaw", "pcm_alaw", 8000, None, "audio/x-alaw-basic"),
        ("opus_48000_192", "ogg", "libopus", 48000, 192_000, "audio/ogg"),
        ("wav_24000", "wav", "pcm_s16le", 24000, None, "audio/wav"),
    ],
)
def test_output_format_names(name, container, codec, rate, bit_rate, media) -> None:
    fmt = parse_output_format(name)
    assert (fmt.spec.container, fmt.spec.codec, fmt.spec.sample_rate, fmt.spec.bit_rate) == (container, codec, rate, bit_rate)
    assert fmt.media_type == media


@pytest.mark.parametrize(
    "name", ["", "mp3", "pcm_7999", "pcm_48001", "pcm_16000_32", "ulaw_16000", "mp3_44100", "mp3_44000_128",
             "mp3_44100_999", "opus_24000_64", "opus_48000_3", "flac_44100", "mp3_1_2", "x" * 5000]
)
def test_bad_output_formats_are_400_naming_the_parameter(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_output_format(name)
    assert info.value.param == "output_format"
    assert len(info.value.message) < 400


def test_voice_settings_map_onto_our_controls_at_the_defaults() -> None:
    family = FAMILIES[ORIGINAL]
    none = speech_request(text="Hi.", family=family, voice="alloy")
    assert (none.exaggeration, none.cfg_weight, none.speed, none.seed) == (None, None, 1.0, None)
    defaults = speech_request(
        text="Hi.", family=family, voice="alloy",
        voice_settings=VoiceSettings(stability=0.5, similarity_boost=0.75, style=0.0, use_speaker_boost=True),
    )
    assert defaults.exaggeration == pytest.approx(0.5) and defaults.cfg_weight == pytest.approx(0.5)
    lively = speech_request(
        text="Hi.", family=family, voice="alloy", seed=7, language="en",
        voice_settings=VoiceSettings(stability=0.0, style=1.0, similarity_boost=1.0, speed=1.2),
    )
    assert (lively.exaggeration, lively.speed, lively.seed, lively.language) == (2.0, 1.2, 7, "en")
    assert lively.cfg_weight == pytest.approx(2 / 3)
    assert speech_request(text="Hi.", family=family, voice="a", voice_settings=VoiceSettings(style=0.3)).exaggeration == pytest.approx(0.8)
