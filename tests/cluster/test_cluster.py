"""Cluster mode on a local Ray instance: the HTTP tier (our app on a loopback server) in front
of two fake-engine replicas in their own processes. One Ray instance and one deployment for
the module; the replica-killing test runs last and waits for Ray to replace the replica."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import math
import struct
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from structlog.testing import capture_logs

pytest.importorskip("ray.serve")

from cluster_harness import (  # noqa: E402
    HOLD,
    WAIT,
    cluster_settings,
    deploy_fake_tier,
    job_records,
    kill,
    local_ray,
    replica_records,
    wait_for_replicas,
)
from harness import serve_on_loopback  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.cluster.replica import JobRecord  # noqa: E402
from gateway.cluster.remote_engine import RemoteEngine  # noqa: E402
from gateway.errors import EngineUnavailableError  # noqa: E402
from gateway.settings import Settings  # noqa: E402

LONG_TEXT = " ".join(f"This is sentence number {i}, spoken by the cluster." for i in range(12))
"""Three chunks of 50 fake tokens: ~0.5 s of replica time (cluster_harness.PIECE_DELAY_S)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def tier(root: Path) -> Iterator[Settings]:
    settings = cluster_settings(root)
    with local_ray():
        deploy_fake_tier(settings, root / "gate")
        yield settings


@pytest.fixture
def gate(root: Path) -> Iterator[Path]:
    """While this file exists, jobs whose text says HOLD keep their replica slot."""
    path = root / "gate"
    path.touch()
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def base_url(tier: Settings) -> Iterator[str]:
    with serve_on_loopback(create_app(tier, engine=RemoteEngine(tier)), timeout_s=60) as url:
        yield url


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=f"{base_url}/v1", max_retries=0, timeout=60)


def speech(text: str, **extra: object) -> dict[str, object]:
    return {"model": "tts-1", "input": text, "voice": "alloy", **extra}


def sse_events(text: str) -> list[dict[str, object]]:
    return [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block.startswith("data: ")]


def outcomes(settings: Settings, request_ids: set[str]) -> dict[str, tuple[str, str]]:
    """request id -> (replica id, outcome) for these requests."""
    return {job.job.request_id: (rid, job.outcome) for rid, job in job_records(settings) if job.job.request_id in request_ids}


def test_requests_spread_over_both_replicas(tier: Settings, base_url: str, valid_audio) -> None:
    ids = {f"spread-{i}" for i in range(8)}

    def one(request_id: str) -> bytes:
        response = sdk(base_url).audio.speech.create(
            model="tts-1", input=LONG_TEXT, voice="alloy", response_format="wav", extra_headers={"x-request-id": request_id}
        )
        return response.content

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        bodies = list(pool.map(one, sorted(ids)))
    for body in bodies:
        valid_audio(body, "wav")
    assert len(set(bodies)) == 1  # the same request gives the same audio on either replica
    served = outcomes(tier, ids)
    assert {outcome for _, outcome in served.values()} == {"completed"} and set(served) == ids
    assert len({rid for rid, _ in served.values()}) == 2, served


async def test_health_needs_a_running_replica(tier: Settings) -> None:
    """/ready follows RemoteEngine.check_health: healthy while a replica runs, not without."""
    await RemoteEngine(tier).check_health()
    elsewhere = RemoteEngine(msgspec.structs.replace(tier, cluster_app_name="no-such-application"))
    with pytest.raises(EngineUnavailableError, match="no engine replica"):
        await elsewhere.check_health()


def test_streaming_and_sse_through_the_sdk(tier: Settings, base_url: str, gate: Path, valid_audio) -> None:
    with sdk(base_url).audio.speech.with_streaming_response.create(
        model="tts-1", input=f"{HOLD} on. {LONG_TEXT}", voice="alloy", response_format="mp3", extra_headers={"x-request-id": "streamed"}
    ) as response:
        pieces = response.iter_bytes()
        first = next(pieces)
        assert outcomes(tier, {"streamed"})["streamed"][1] == "running"  # bytes left before the replica finished
        gate.unlink()
        data = first + b"".join(pieces)
    assert outcomes(tier, {"streamed"})["streamed"][1] == "completed"
    valid_audio(data, "mp3")

    answer = httpx.post(f"{base_url}/v1/audio/speech", json=speech("Hello, cluster.", stream_format="sse", response_format="opus"), timeout=60)
    events = sse_events(answer.text)
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    # usage is counted in the HTTP tier with the replicas' own token counter
    assert events[-1]["usage"]["input_tokens"] == len("Hello, cluster.")
    valid_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "opus")


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_client_hangup_cancels_the_replica_job(tier: Settings, base_url: str, stream_format: str) -> None:
    request_id = f"hangup-{stream_format}"
    body = speech(LONG_TEXT, stream_format=stream_format)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        with client.stream("POST", "/v1/audio/speech", json=body, headers={"x-request-id": request_id}) as response:
            assert response.status_code == 200
            next(response.iter_raw())
    deadline = time.monotonic() + 10
    while outcomes(tier, {request_id})[request_id][1] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcomes(tier, {request_id})[request_id][1] == "cancelled"


def tone_wav(seconds: float, frequency: float = 220.0) -> bytes:
    rate = 24_000
    frames = b"".join(
        struct.pack("<h", int(12_000 * math.sin(2 * math.pi * frequency * i / rate))) for i in range(int(seconds * rate))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def test_a_voice_created_through_http_is_used_by_both_replicas(tier: Settings, base_url: str) -> None:
    before = replica_records(tier)
    created = httpx.post(
        f"{base_url}/v1/audio/voices",
        data={"name": "shared-voice"},
        files={"audio_sample": ("clip.wav", tone_wav(4.0), "audio/wav")},
        timeout=60,
    )
    assert created.status_code == 200, created.text
    ids = {f"voice-{i}" for i in range(8)}

    def one(request_id: str) -> bytes:
        body = speech(LONG_TEXT, voice="shared-voice", response_format="pcm")
        answer = httpx.post(f"{base_url}/v1/audio/speech", json=body, headers={"x-request-id": request_id}, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.content

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        bodies = list(pool.map(one, sorted(ids)))
    assert len(set(bodies)) == 1
    alloy = httpx.post(f"{base_url}/v1/audio/speech", json=speech(LONG_TEXT, response_format="pcm"), timeout=60)
    assert alloy.content != bodies[0]  # the created voice, not a fallback

    served = {rid for rid, job in job_records(tier) if job.job.request_id in ids and job.job.voice.name == "shared-voice"}
    assert len(served) == 2
    after = replica_records(tier)
    computed = sum(r.conditionals_computed for r in after.values()) - sum(r.conditionals_computed for r in before.values())
    loaded = sum(r.conditionals_loaded for r in after.values()) - sum(r.conditionals_loaded for r in before.values())
    assert computed == 1  # once for the cluster ...
    assert loaded == 1  # ... and the other replica read it from the shared cache


async def test_a_full_tier_answers_429_with_retry_after(tier: Settings, base_url: str, gate: Path, api_error) -> None:
    """Past what the replicas run (max_ongoing_requests each) and what this HTTP process may
    queue for them (cluster_max_queued_requests), a call is refused: a 429, at once."""
    capacity = tier.cluster_max_replicas * tier.cluster_max_ongoing_requests + tier.cluster_max_queued_requests
    assert tier.max_in_flight > capacity + 8  # the HTTP tier's own admission is not what refuses
    body = speech(f"{HOLD} this slot.", response_format="pcm")  # held: none ends during the test
    began = time.time()  # the records go back to the tier's start: this test's jobs start after this
    limits = httpx.Limits(max_connections=capacity + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        answered, hung_up = await early_answers(client, body, capacity + 8, at_least=8)
    assert len(answered) >= 8  # the 8 over capacity (Serve's own bound may refuse a few more)
    for answer in answered:
        api_error(answer, 429, code="server_overloaded")
        assert int(answer.headers["retry-after"]) >= 1

    # Every job that ran when the clients hung up is cancelled: that is the tier's to do. A call
    # abandoned in the instant Serve hands it to a replica (the hang-up frees the held slots,
    # and the queued calls are assigned as they are cancelled) may start there anyway: Serve's
    # cancellation is best effort at that moment (ray-project/ray#52533). Such a job is an
    # ordinary one that nobody hears: released from the gate, it ends and frees its slot. A
    # replica whose slots such jobs hold cannot answer the record call (routed as speech calls
    # are), so: wait for the cancellations while every replica answers (at most 10 s), remove
    # the gate, read every record once all jobs have ended; a held job that was not cancelled
    # has then completed, and its outcome tells.
    def ours() -> list[JobRecord] | None:
        try:
            return [job for _, job in job_records(tier, complete=True) if job.started_at >= began]
        except TimeoutError:  # a replica still full: not known yet
            return None

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = ours()
        if jobs is not None and not [job for job in jobs if job.started_at < hung_up and job.outcome == "running"]:
            break
        await asyncio.sleep(0.1)
    gate.unlink()
    deadline = time.monotonic() + 20
    while (jobs := ours()) is None or [job for job in jobs if job.outcome == "running"]:
        assert time.monotonic() < deadline, describe([j for j in jobs or [] if j.outcome == "running"], hung_up)
        await asyncio.sleep(0.1)
    not_cancelled = [job for job in jobs if job.started_at < hung_up and job.outcome != "cancelled"]
    assert not not_cancelled, describe(not_cancelled, hung_up)
    assert [job for job in jobs if job.started_at < hung_up], "the held jobs are in the records"


def describe(jobs: list[JobRecord], hung_up: float) -> str:
    return "; ".join(f"{job.job.request_id} started {job.started_at - hung_up:+.3f} s from the hang-up, {job.outcome}"
                     for job in jobs)


async def early_answers(client: httpx.AsyncClient, body: dict[str, object], count: int,
                        at_least: int = 1) -> tuple[list[httpx.Response], float]:
    """Send ``count`` requests at once; the answers that come back before none has come for a
    second once ``at_least`` have (a stalled host's quiet second is not the end of them), and
    the time (``time.time()``) at which the rest are then hung up on (their replica jobs are
    cancelled with them)."""
    calls = [asyncio.create_task(client.post("/v1/audio/speech", json=body)) for _ in range(count)]
    answered: list[httpx.Response] = []
    try:
        pending: set[asyncio.Task[httpx.Response]] = set(calls)
        deadline = asyncio.get_running_loop().time() + 20
        while pending and asyncio.get_running_loop().time() < deadline:
            done, pending = await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if not done and len(answered) >= at_least:
                break
            answered += [task.result() for task in done]
    finally:
        hung_up = time.time()
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    return answered, hung_up


def test_killing_a_replica_fails_only_its_streams(tier: Settings, base_url: str, gate: Path) -> None:
    """Runs last in the module: Ray replaces the killed replica before the module ends."""
    # Held streams, opened one at a time until both replicas run some (Serve's router may put
    # the first four on one replica: at max_ongoing_requests it takes no more, the next goes
    # to the other). Which replica runs which is read from the jobs' own marker files: a full
    # replica answers no record() call, and a stream's first bytes (the mp3 header) may come
    # before its job starts.
    running = gate.parent / "running"
    streams: dict[str, tuple[httpx.Client, httpx.Response, Iterator[bytes], bytes]] = {}
    pids: dict[str, int] = {}
    for i in range(2 * tier.cluster_max_ongoing_requests):
        if len(streams) >= 4 and len(set(pids.values())) == 2:
            break
        request_id = f"kill-{i}"
        client = httpx.Client(base_url=base_url, timeout=60)
        fmt = "sse" if i % 2 else "audio"
        request = client.build_request("POST", "/v1/audio/speech", json=speech(f"{HOLD} on. {LONG_TEXT}", stream_format=fmt), headers={"x-request-id": request_id})
        response = client.send(request, stream=True)
        assert response.status_code == 200
        pieces = response.iter_raw()
        streams[request_id] = (client, response, pieces, next(pieces))
        marker, deadline = running / request_id, time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"{request_id}: its job did not start within 30 s"
        pids[request_id] = int(marker.read_text())
    ids = list(streams)
    assert len(set(pids.values())) == 2, pids
    victim_pid = pids[ids[0]]
    doomed = {rid for rid, pid in pids.items() if pid == victim_pid}
    with capture_logs() as logs:
        kill(victim_pid)
        gate.unlink()  # the survivors' streams go on to the end

        results: dict[str, str] = {}
        for request_id, (client, response, pieces, first) in streams.items():
            data = first
            try:
                for piece in pieces:
                    data += piece
                if response.headers["content-type"].startswith("text/event-stream"):
                    results[request_id] = str(sse_events(data.decode())[-1]["type"])
                else:
                    results[request_id] = "complete"
            except httpx.TransportError:
                results[request_id] = "closed early"
            finally:
                response.close()
                client.close()
    for request_id in ids:
        sse = ids.index(request_id) % 2 == 1
        if request_id in doomed:
            assert results[request_id] == ("error" if sse else "closed early"), (request_id, results)
        else:
            assert results[request_id] == ("speech.audio.done" if sse else "complete"), (request_id, results)
    assert doomed and len(doomed) < len(ids)
    # each stream the dead replica took down logs one line that says so, not a traceback
    failed = [e for e in logs if e["event"] == "speech_stream_failed"]
    assert len(failed) == len(doomed), failed
    for event in failed:
        assert "replica" in event["error"] and event["code"] == "engine_error" and not event.get("exc_info"), event

    # the surviving replica takes new requests at once, and the server stays ready
    assert httpx.get(f"{base_url}/ready").status_code == 200
    for i in range(4):
        answer = httpx.post(f"{base_url}/v1/audio/speech", json=speech("After the crash."), timeout=60)
        assert answer.status_code == 200, answer.text
    wait_for_replicas(tier, 2)
    assert victim_pid not in {record.pid for record in replica_records(tier).values()}
    assert httpx.get(f"{base_url}/ready").status_code == 200


def test_a_call_whose_replica_dies_before_any_audio_is_tried_again(tier: Settings, base_url: str, gate: Path, valid_audio) -> None:
    """Nothing had left for the client yet, so the request is whole on another replica."""

    def placed() -> tuple[str, int] | None:
        for rid, job in job_records(tier):
            if job.job.request_id == "retried" and job.outcome == "running":
                return rid, replica_records(tier)[rid].pid
        return None

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = speech(f"{WAIT} for it.", response_format="wav")
        answer = pool.submit(httpx.post, f"{base_url}/v1/audio/speech", json=body, headers={"x-request-id": "retried"}, timeout=60)
        deadline = time.monotonic() + 20
        while (first := placed()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first is not None
        kill(first[1])
        while ((again := placed()) is None or again[0] == first[0]) and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        assert again is not None and again[0] != first[0]  # the same job, now on the other replica
        gate.unlink()
        response = answer.result()
    assert response.status_code == 200, response.text
    valid_audio(response.content, "wav")
    wait_for_replicas(tier, 2)
