"""Cluster mode on a real engine: one reference-engine replica on dummy weights (CPU) behind
the HTTP tier, through the OpenAI SDK and SSE. Slow: the replica writes and loads the dummy
checkpoint, then runs the real T3 + S3Gen; so one replica and two short requests."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

from cluster_harness import cluster_settings, local_ray, wait_for_replicas  # noqa: E402
from harness import serve_on_loopback  # noqa: E402
from weights_support import cache_with_shared_weights  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.cluster import deploy  # noqa: E402
from gateway.cluster.remote_engine import RemoteEngine  # noqa: E402
from gateway.settings import Settings  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("cluster-reference")
    settings = cluster_settings(
        root,
        cache_dir=cache_with_shared_weights(root),  # the suite's dummy checkpoint, written once
        engine="reference",
        device="cpu",
        load_format="dummy",
        max_speech_tokens=10,
        flow_steps=2,
        cluster_min_replicas=1,
        cluster_max_replicas=1,
        cluster_max_ongoing_requests=0,  # from the engine: the reference engine's bound
    )
    with local_ray():
        deploy.deploy(settings)  # the server's own engine factory, in the replica process
        wait_for_replicas(settings, 1, timeout_s=400)
        yield settings


@pytest.fixture(scope="module")
def base_url(tier: Settings) -> Iterator[str]:
    with serve_on_loopback(create_app(tier, engine=RemoteEngine(tier)), timeout_s=120, poll_s=0.5) as url:
        yield url


def test_ready_names_the_replicas_engine(base_url: str) -> None:
    ready = httpx.get(f"{base_url}/ready").json()
    assert ready["engine"] == "cluster:reference" and ready["model"].startswith("cluster:")


def test_sdk_speech_from_a_reference_replica(base_url: str, valid_audio) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    response = client.audio.speech.create(model="tts-1", input="Hello there.", voice="default", response_format="mp3", extra_body={"seed": 3})
    assert valid_audio(response.content, "mp3").duration_s < 1.5  # 10 tokens: 0.4 s, plus codec padding


def test_sse_usage_counts_with_the_replicas_tokenizer(tier: Settings, base_url: str, valid_audio) -> None:
    from chatterbox.models.tokenizers import EnTokenizer

    from gateway.engine.checkpoint.dummy import dummy_checkpoint_path

    text = "Hi there, cluster."
    body = {"model": "chatterbox", "input": text, "voice": "default", "response_format": "wav", "stream_format": "sse"}
    response = httpx.post(f"{base_url}/v1/audio/speech", json=body, timeout=300)
    events = [json.loads(b[len("data: "):]) for b in response.text.split("\n\n") if b.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    tokenizer = EnTokenizer(str(dummy_checkpoint_path(tier) / "tokenizer.json"))
    assert events[-1]["usage"]["input_tokens"] == len(tokenizer.encode(text)) > 0
    assert 0 < events[-1]["usage"]["output_tokens"] <= 10
    valid_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "wav")
