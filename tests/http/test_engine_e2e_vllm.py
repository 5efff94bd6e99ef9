"""End to end on the vLLM engine (GPU machines only; skipped elsewhere): one real server on
loopback running VllmEngine with all three model families loaded (dummy weights), and for
each family the OpenAI SDK, a streamed body, SSE, the same seed twice, and hanging up
(cancellation frees the engine for the next request); the audio decoded by FFmpeg.
Multilingual requests name their language (the detector is not installed on GPU machines).

Run on the GPU: ``pytest -m gpu tests/http/test_engine_e2e_vllm.py`` (the server start, three
vLLM engines and their vocoders' CUDA graphs, is most of its time). ``CHATTERBOX_*`` variables
set in the environment override the fixture's serving settings (the GPU script uses this to
serve with the benchmark's vLLM settings, so both runs share vLLM's compile cache).
``CHATTERBOX_E2E_MODELS`` (comma-separated) serves only those families: the engine core in a
thread (``CHATTERBOX_VLLM_ENGINE_CORE=thread``) holds one.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from gateway.engine.factory import vllm_available
from gateway.engine.vllm.t3.sampler_warmup import warm_rows
from harness import serve_on_loopback
from weights_support import cache_with_shared_weights

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="needs CUDA and vLLM")]

MAX_TOKENS = 50
ALL_FAMILIES = ("chatterbox", "chatterbox-turbo", "chatterbox-multilingual")
_CHOSEN = os.environ.get("CHATTERBOX_E2E_MODELS", ",".join(ALL_FAMILIES)).split(",")
FAMILIES = tuple(m for m in ALL_FAMILIES if m in _CHOSEN)


@dataclass(frozen=True)
class Speaker:
    """How each family is spoken to: its text (Turbo's with a tag) and extra fields."""

    model: str
    text: str
    long_text: str
    extra: dict[str, Any] = field(default_factory=dict)


SPEAKERS = {
    "chatterbox": Speaker("chatterbox", "Hello there. How are you?", "A long one. " * 8),
    "chatterbox-turbo": Speaker("chatterbox-turbo", "Well [laugh] hello there. How are you?",
                                "A long one [sigh] again. " * 6),
    "chatterbox-multilingual": Speaker("chatterbox-multilingual", "Bonjour à tous. Comment allez-vous ?",
                                       "Une longue phrase. " * 8, {"language": "fr"}),
}


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    from gateway.app import create_app
    from gateway.settings import load_settings

    root = tmp_path_factory.mktemp("vllm")
    defaults = {"vllm_max_num_seqs": 16, "vllm_max_model_len": 1024, "vllm_gpu_memory_utilization": 0.3,
                # the suite's dummy checkpoints (tests/weights_support.py): written once per machine
                "cache_dir": cache_with_shared_weights(root)}
    overrides = {k: v for k, v in defaults.items() if f"CHATTERBOX_{k.upper()}" not in os.environ}
    settings = load_settings(environ=dict(os.environ), overrides={
        **overrides, "engine": "vllm", "load_format": "dummy", "models": list(FAMILIES),
        "voices_dir": str(root / "voices"), "max_speech_tokens": MAX_TOKENS, "log_format": "json"})
    app = create_app(settings)
    # dummy checkpoints, three vLLM engines' compile and graphs, the vocoders' CUDA graphs
    with serve_on_loopback(app, timeout_s=900, poll_s=0.5, join_s=60) as base_url:
        yield base_url, app.state["services"].engine


@pytest.fixture(scope="module")
def base_url(vllm_server: tuple[str, Any]) -> str:
    return vllm_server[0]


def _sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_every_family_is_served_by_the_vllm_engine_and_its_start_was_logged(vllm_server) -> None:
    base_url, engine = vllm_server
    assert engine.name == "vllm" and engine.models == FAMILIES
    listed = [m.id for m in _sdk(base_url).models.list().data]
    assert listed[:len(FAMILIES)] == list(FAMILIES)
    parts = {(p["family"], p["part"]) for p in engine.start_parts}
    for family in FAMILIES:
        for part in ("checkpoint", "t3_engine", "modules", "vocoder", "warm_up", "warm_up_sampler"):
            assert (family, part) in parts, (family, part)
    waves = {p["family"]: p["waves"] for p in engine.start_parts if p["part"] == "warm_up_sampler"}
    rows = warm_rows(engine.settings.vllm_max_num_seqs)  # vLLM's Triton top-k/top-p kernel variants, compiled at start
    if "chatterbox-turbo" in FAMILIES:
        assert waves["chatterbox-turbo"] == [f"{n}x top_p={p}" for p in (0.95, 1.0) for n in rows], waves
    if "chatterbox" in FAMILIES:
        assert waves["chatterbox"] == [f"{n}x top_p=0.95" for n in rows], waves
    graphs = [p for p in engine.start_parts if p["part"] == "vocoder"]
    assert all(p["cfm_graphs"] > 0 for p in graphs), graphs  # Turbo's mean-flow solve is captured too
    assert all(p["encoder_graphs"] > 0 and p["hift_graphs"] > 0 for p in graphs), graphs


@pytest.mark.parametrize("family", FAMILIES)
def test_sdk_speech(base_url: str, family: str, valid_audio) -> None:
    speaker = SPEAKERS[family]
    response = _sdk(base_url).audio.speech.create(
        model=family, input=speaker.text, voice="default", response_format="mp3",
        extra_body={"seed": 3, **speaker.extra})
    probe = valid_audio(response.content, "mp3")
    tail = 3 / 25 if family == "chatterbox-turbo" else 0  # Turbo's silence tokens
    assert probe.duration_s < 2 * (MAX_TOKENS / 25 + tail) + 1  # two chunks at most 50 tokens each


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_body_arrives_in_pieces(base_url: str, family: str) -> None:
    speaker = SPEAKERS[family]
    body = {"model": family, "input": speaker.long_text, "voice": "default", "response_format": "pcm",
            "seed": 4, **speaker.extra}
    pieces, t0, first = [], time.monotonic(), None
    with httpx.stream("POST", f"{base_url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200
        for part in response.iter_bytes():
            if part:
                first = first if first is not None else time.monotonic() - t0
                pieces.append(part)
    audio = b"".join(pieces)
    assert len(pieces) > 1 and len(audio) % 2 == 0 and len(audio) > 0
    assert first is not None and first < time.monotonic() - t0  # the first bytes came before the last


def _snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    noise = float(np.sum((cand - ref) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref**2)) / noise)


class _TokenLog:
    """The speech token ids T3 made per vLLM request, recorded around the family's in-process
    ``AsyncLLM.generate`` (the seed decides these; the audio then follows from them)."""

    def __init__(self, llm: Any) -> None:
        self.llm, self.real = llm, llm.generate
        self.ids: list[list[int]] = []

    def __enter__(self) -> _TokenLog:
        async def generate(*args: Any, **kwargs: Any):
            ids: list[int] = []
            self.ids.append(ids)
            async for out in self.real(*args, **kwargs):
                ids.extend(out.outputs[0].token_ids)  # the engine asks for deltas
                yield out

        self.llm.generate = generate
        return self

    def __exit__(self, *exc: object) -> None:
        self.llm.generate = self.real


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_audio(vllm_server, family: str) -> None:
    base_url, engine = vllm_server
    speaker = SPEAKERS[family]

    def speech(seed: int) -> tuple[np.ndarray, list[int]]:
        body = {"model": family, "input": "Same seed.", "voice": "default", "response_format": "pcm",
                "seed": seed, "cfg_weight": 0.3, **speaker.extra}
        with _TokenLog(engine.runtimes[family].llm) as log:
            response = httpx.post(f"{base_url}/v1/audio/speech", json=body, timeout=120)
        assert response.status_code == 200 and response.content
        assert len(log.ids) == 1 and log.ids[0], log.ids  # one text chunk, one vLLM request
        return np.frombuffer(response.content, dtype=np.int16), log.ids[0]

    (first, first_ids), (second, second_ids), (_, other_ids) = speech(11), speech(11), speech(12)
    # Same seed: the same speech tokens, and so the same audio; the GPU vocoder/watermark
    # kernels are not bitwise deterministic (seen: one LSB apart in places), so the audio is
    # compared as a signal.
    assert first_ids == second_ids
    assert first.shape == second.shape and _snr_db(first, second) > 40
    # Another seed: other tokens. Not judged by the audio: with random weights and the vLLM
    # engine's fixed noise tapes, S3Gen's output barely depends on the tokens (the H200 run of
    # 2026-12-04 saw 33-37 dB between seeds 11 and 12; on the CPU, two random 30-token
    # sequences through one random S3Gen give 32.6 dB).
    assert other_ids != first_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_sse(base_url: str, family: str, valid_audio) -> None:
    speaker = SPEAKERS[family]
    body = {"model": family, "input": "Hi.", "voice": "default", "response_format": "opus",
            "stream_format": "sse", "cfg_weight": 0.0, **speaker.extra}
    response = httpx.post(f"{base_url}/v1/audio/speech", json=body, timeout=120)
    assert response.status_code == 200
    events = [json.loads(b[len("data: "):]) for b in response.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    assert 0 < events[-1]["usage"]["output_tokens"] <= MAX_TOKENS  # Turbo's silence tail is no usage
    valid_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "opus")


@pytest.mark.parametrize("family", FAMILIES)
def test_disconnect_frees_the_engine(vllm_server, family: str) -> None:
    base_url, engine = vllm_server
    speaker = SPEAKERS[family]
    body = {"model": family, "input": speaker.long_text, "voice": "default", "response_format": "pcm",
            **speaker.extra}
    for _ in range(4):  # hang up on several streams right after their first bytes
        with httpx.stream("POST", f"{base_url}/v1/audio/speech", json=body, timeout=120) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
    t0 = time.monotonic()
    after = httpx.post(f"{base_url}/v1/audio/speech", json={**body, "input": "Still here."}, timeout=120)
    assert after.status_code == 200 and after.content
    assert time.monotonic() - t0 < 30
    vocoder = engine.runtimes[family].vocoder
    for _ in range(100):  # the hung-up streams' windows are gone
        if vocoder.open_streams == 0:
            break
        time.sleep(0.1)
    assert vocoder.open_streams == 0



def test_languages_a_family_does_not_speak_are_refused_before_any_engine_work(base_url: str) -> None:
    for model, language in (("chatterbox-multilingual", "uk"), ("chatterbox-turbo", "es"), ("chatterbox", "fr")):
        if model not in FAMILIES:
            continue
        body = {"model": model, "input": "Hello.", "voice": "default", "language": language}
        response = httpx.post(f"{base_url}/v1/audio/speech", json=body, timeout=30)
        assert response.status_code == 400, (model, response.text)
        assert response.json()["error"]["param"] == "language"
