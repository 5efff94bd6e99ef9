"""End to end on a real engine with dummy weights: the OpenAI SDK against a real server on
loopback, the audio decoded by FFmpeg. Slow (the dummy checkpoint is written once per module,
then each request runs the real T3 + S3Gen), so few and small.

By default (and in CI) the engine is the reference engine on the CPU. The same tests, unchanged,
run against the vLLM engine on a GPU with ``CHATTERBOX_E2E_ENGINE=vllm`` (device: cuda)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from gateway.app import create_app
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
        cache_dir=str(root / "cache"),
        voices_dir=str(root / "voices"),
        max_speech_tokens=10,
        flow_steps=2,
        log_format="json",
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    try:
        while True:
            try:
                ready = httpx.get(f"{base_url}/ready", timeout=2)
                if ready.status_code == 200:
                    break
                assert "failed" not in ready.json()["error"]["message"], ready.text
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and thread.is_alive(), f"{engine} engine did not load"
            time.sleep(0.5)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


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
