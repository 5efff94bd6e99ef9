"""End to end on the vLLM engine (GPU machines only; skipped elsewhere): the OpenAI SDK and
SSE against a real server on loopback running VllmEngine with dummy weights, the audio
decoded by FFmpeg, and cancellation freeing the engine for the next request.

Run on the GPU: ``pytest -m gpu tests/http/test_engine_e2e_vllm.py``.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from gateway.engine.factory import vllm_available
from harness import serve_on_loopback
from weights_support import cache_with_shared_weights

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="needs CUDA and vLLM")]

MAX_TOKENS = 50


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from gateway.app import create_app
    from gateway.settings import Settings

    root = tmp_path_factory.mktemp("vllm")
    settings = Settings(engine="vllm", load_format="dummy", cache_dir=cache_with_shared_weights(root),
                        voices_dir=str(root / "voices"), max_speech_tokens=MAX_TOKENS,
                        vllm_max_num_seqs=16, vllm_max_model_len=1024, vllm_gpu_memory_utilization=0.3,
                        log_format="json")
    # dummy checkpoint, vLLM compile and graph capture
    with serve_on_loopback(create_app(settings), timeout_s=400, poll_s=0.5, join_s=60) as base_url:
        yield base_url


def _sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_sdk_speech_on_the_vllm_engine(vllm_server: str, valid_audio) -> None:
    response = _sdk(vllm_server).audio.speech.create(
        model="tts-1", input="Hello there. How are you?", voice="default", response_format="mp3",
        extra_body={"seed": 3})
    probe = valid_audio(response.content, "mp3")
    assert probe.duration_s < 2 * MAX_TOKENS / 25 + 1  # two chunks at most 50 tokens each


def _snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    noise = float(np.sum((cand - ref) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref**2)) / noise)


def test_same_seed_same_audio(vllm_server: str) -> None:
    def speech(seed: int) -> np.ndarray:
        body = {"model": "chatterbox", "input": "Same seed.", "voice": "default", "response_format": "pcm",
                "seed": seed, "cfg_weight": 0.3}
        response = httpx.post(f"{vllm_server}/v1/audio/speech", json=body, timeout=120)
        assert response.status_code == 200 and response.content
        return np.frombuffer(response.content, dtype=np.int16)

    first, second, other = speech(11), speech(11), speech(12)
    # Same seed: the same speech tokens; the GPU vocoder/watermark kernels are not bitwise
    # deterministic (seen: one LSB apart in places), so the audio is compared as a signal.
    assert first.shape == second.shape and _snr_db(first, second) > 40
    assert other.shape != first.shape or _snr_db(first, other) < 10


def test_sse_on_the_vllm_engine(vllm_server: str, valid_audio) -> None:
    body = {"model": "chatterbox", "input": "Hi.", "voice": "default", "response_format": "opus",
            "stream_format": "sse", "cfg_weight": 0.0}
    response = httpx.post(f"{vllm_server}/v1/audio/speech", json=body, timeout=120)
    assert response.status_code == 200
    events = [json.loads(b[len("data: "):]) for b in response.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    assert 0 < events[-1]["usage"]["output_tokens"] <= MAX_TOKENS
    valid_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "opus")


def test_disconnect_frees_the_engine(vllm_server: str) -> None:
    body = {"model": "chatterbox", "input": "A long one. " * 8, "voice": "default", "response_format": "pcm"}
    for _ in range(4):  # hang up on several streams right after their first bytes
        with httpx.stream("POST", f"{vllm_server}/v1/audio/speech", json=body, timeout=120) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
    t0 = time.monotonic()
    after = httpx.post(f"{vllm_server}/v1/audio/speech",
                       json={**body, "input": "Still here."}, timeout=120)
    assert after.status_code == 200 and after.content
    assert time.monotonic() - t0 < 30
