"""End to end on a real engine with dummy weights: the OpenAI SDK against a real server on
loopback, the audio decoded by FFmpeg. Slow (the dummy checkpoint is written once per module,
then each request runs the real T3 + S3Gen), so few and small.

By default (and in CI) the engine is the reference engine on the CPU. The same tests, unchanged,
run against the vLLM engine on a GPU with ``CHATTERBOX_E2E_ENGINE=vllm`` (device: cuda)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.app import create_app
from harness import serve_on_loopback
from weights_support import cache_with_shared_weights
from gateway.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import torch

    torch.set_num_threads(2)
    engine = os.environ.get("CHATTERBOX_E2E_ENGINE", "reference")
    root = tmp_path_factory.mktemp(engine)
    settings = Settings(
        engine=engine,
        device="cpu" if engine == "reference" else "cuda",
        load_format="dummy",
        cache_dir=cache_with_shared_weights(root),  # the dummy checkpoint: written once
        voices_dir=str(root / "voices"),
        max_speech_tokens=10,
        flow_steps=2,
        log_format="json",
    )
    # dummy checkpoint, engine load (and on the GPU vLLM's compile and graph capture)
    with serve_on_loopback(create_app(settings), timeout_s=400, poll_s=0.5, join_s=60) as base_url:
        yield base_url


def test_sdk_speech_on_a_real_engine(engine_server: str, valid_audio) -> None:
    client = openai.OpenAI(base_url=f"{engine_server}/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.audio.speech.create(
        model="tts-1", input="Hello there.", voice="default", response_format="mp3", extra_body={"seed": 3}
    )
    probe = valid_audio(response.content, "mp3")
    # 10 speech tokens at 25 per second is 0.4 s; codec padding adds a little
    assert probe.duration_s < 1.5


def test_sse_on_a_real_engine(engine_server: str, valid_audio) -> None:
    body = {"model": "chatterbox", "input": "Hi.", "voice": "default", "response_format": "opus", "stream_format": "sse"}
    response = httpx.post(f"{engine_server}/v1/audio/speech", json=body, timeout=120)
    assert response.status_code == 200
    events = [json.loads(block[len("data: "):]) for block in response.text.split("\n\n") if block.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    usage = events[-1]["usage"]
    assert 0 < usage["output_tokens"] <= 10 and usage["input_tokens"] > 0
    valid_audio(b"".join(base64.b64decode(event["audio"]) for event in events[:-1]), "opus")
