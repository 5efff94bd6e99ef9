"""Each new model family end to end on the reference engine with dummy weights: the OpenAI SDK
against a real server on loopback, audio decoded by FFmpeg. (The original family is
tests/http/test_engine_e2e.py.)

Slow: each family's dummy checkpoint is written once into the suite's cache
(tests/weights_support.py; Turbo 2.8 GB, Multilingual 3.0 GB, ~1 min each on 2 cores), then
each test loads one family (~30 s) and speaks a few tokens with a clip voice, so the family's
conditionals are computed by its own modules (Turbo: loudness-normalised clip, 15 s prompt,
no Perceiver)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from gateway.engine.checkpoint.dummy import dummy_checkpoint_path
from gateway.models.families import FAMILIES
from gateway.settings import Settings
from harness import serve_on_loopback
from weights_support import cache_with_shared_weights, suite_cache_dir

pytestmark = pytest.mark.slow


def _serve(model: str, root: Path, max_speech_tokens: int) -> Iterator[str]:
    import torch

    torch.set_num_threads(2)
    settings = Settings(
        engine="reference",
        device="cpu",
        models=(model,),
        load_format="dummy",
        cache_dir=cache_with_shared_weights(root),  # the dummy checkpoint: written once
        voices_dir=str(root / "voices"),
        max_speech_tokens=max_speech_tokens,
        flow_steps=2,
        log_format="json",
    )
    assert dummy_checkpoint_path(settings, FAMILIES[model]).parent.resolve() == (suite_cache_dir() / "dummy").resolve()
    with serve_on_loopback(create_app(settings), timeout_s=900, poll_s=0.5, join_s=60) as base_url:
        yield base_url


@pytest.fixture
def turbo_server(tmp_path: Path) -> Iterator[str]:
    yield from _serve("chatterbox-turbo", tmp_path, 8)


@pytest.fixture
def multilingual_server(tmp_path: Path) -> Iterator[str]:
    yield from _serve("chatterbox-multilingual", tmp_path, 4)  # a Llama step with CFG costs most


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def test_turbo_speaks_tags_through_the_sdk(turbo_server: str, valid_audio) -> None:
    client = _client(turbo_server)
    assert [model.id for model in client.models.list().data][0] == "chatterbox-turbo"
    response = client.audio.speech.create(
        model="tts-1",  # OpenAI's fast model: Turbo when loaded
        input="Well [chuckle] that went fine.",
        voice="aria",  # a clip: conditionals computed by Turbo's own modules
        response_format="wav",
        extra_body={"seed": 1, "exaggeration": 1.5, "cfg_weight": 0.2},  # accepted, ignored by Turbo
    )
    probe = valid_audio(response.content, "wav")
    # at most 8 speech tokens (0.32 s) plus the three silence tokens Turbo appends
    assert 0 < probe.duration_s <= 0.5
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="chatterbox-turbo", input="Hola.", voice="default", extra_body={"language": "es"})
    assert caught.value.body["param"] == "language"


def test_multilingual_speaks_a_detected_language_through_the_sdk(multilingual_server: str, valid_audio) -> None:
    client = _client(multilingual_server)
    response = client.audio.speech.create(
        model="gpt-4o-mini-tts",  # OpenAI's multilingual model: Multilingual when loaded
        input="Bonjour à tous, comment allez-vous aujourd'hui ?",
        voice="default",
        response_format="mp3",
        extra_body={"seed": 2},
    )
    assert valid_audio(response.content, "mp3").duration_s < 1.0
    response = client.audio.speech.create(
        model="chatterbox-multilingual", input="你好。", voice="james", response_format="flac", extra_body={"language": "zh", "seed": 2}
    )
    valid_audio(response.content, "flac")


