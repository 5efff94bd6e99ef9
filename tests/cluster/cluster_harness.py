"""How the cluster tests run Ray: one local instance per test module (2 CPUs, no dashboard,
no Serve proxy), the engine application deployed once with fake-engine replicas, and ways to
read every replica's record of its jobs.

The replicas are separate processes, so the engine factory they get must be importable
there or travel by value: this module is registered with Ray's pickler by value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.cluster import deploy
from gateway.cluster.handle_router import stop_handle_router
from gateway.cluster.options import DEPLOYMENT_NAME
from gateway.cluster.replica import JobRecord, ReplicaRecord
from gateway.engine.base import AudioChunk, SynthesisJob
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings

PIECE_DELAY_S = 0.03
"""Latency per fake piece (10 tokens) in the replicas, so streams stay open long enough to
observe and cancel."""


HOLD = "HOLD"
"""Jobs whose text contains this word stop after their first piece while the gate file exists;
each writes ``<gate's folder>/running/<request id>`` with its replica's pid when it starts."""
WAIT = "WAIT"
"""Jobs whose text contains this word wait before their first piece while the gate file exists."""


class GatedFakeEngine(FakeEngine):
    """The fake engine, with held jobs: they keep their replica slot, whatever the machine's
    speed, until the test removes the gate file (or hangs up)."""

    def __init__(self, gate: Path) -> None:
        super().__init__(piece_delay_s=PIECE_DELAY_S)
        self.gate = gate

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        held = any(HOLD in chunk for chunk in job.chunks)
        if held:  # which replica runs it, readable even while that replica takes no calls
            running = self.gate.parent / "running"
            running.mkdir(exist_ok=True)
            (running / job.request_id).write_text(str(os.getpid()))
        while any(WAIT in chunk for chunk in job.chunks) and self.gate.exists():
            await asyncio.sleep(0.02)
        inner = super().synthesize(job)
        try:
            async for chunk in inner:
                yield chunk
                while held and self.gate.exists():
                    await asyncio.sleep(0.02)
        finally:
            await inner.aclose()


def gated_fake_engine(settings: Settings, gate: str) -> FakeEngine:
    return GatedFakeEngine(Path(gate))


@contextmanager
def local_ray() -> Iterator[None]:
    """A Ray instance of this test module's own (started here, shut down after)."""
    import ray
    from ray import cloudpickle, serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _start_ray(ray)
    try:
        serve.start(proxy_location="Disabled")
        yield
    finally:
        serve.shutdown()
        stop_handle_router()
        ray.shutdown()


RAY_START_TRIES = 2


def _start_ray(ray: Any) -> None:
    """``ray.init`` for the tests, tried again once if its raylet did not register in Ray's 30 s
    (seen once in a CI-like run on 2 busy cores: a whole module's tests then errored at setup,
    and the same module passed alone in 23 s). Any other failure is raised at once."""
    for attempt in range(1, RAY_START_TRIES + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="chatterbox-tests")
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == RAY_START_TRIES or "timed out during startup" not in str(exc):
                raise


def cluster_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        engine="fake",
        cache_dir=str(root / "cache"),
        voices_dir=str(root / "user-voices"),
        max_speech_tokens=50,
        max_body_bytes=64 * 1024,
        log_format="json",
        cluster="local",
        cluster_deploy=False,  # the module deploys once; every app attaches
        cluster_min_replicas=2,
        cluster_max_replicas=2,
        cluster_replica_cpus=0,
        cluster_max_ongoing_requests=4,
        cluster_max_queued_requests=16,
        max_in_flight=64,
        max_client_share=1.0,  # every request comes from 127.0.0.1: the tier's own limits are tested
    )
    values.update(overrides)
    return Settings(**values)


def deploy_fake_tier(settings: Settings, gate: Path) -> None:
    deploy.deploy(settings, functools.partial(gated_fake_engine, gate=str(gate)))
    wait_for_replicas(settings, settings.cluster_max_replicas)


def wait_for_replicas(settings: Settings, count: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while deploy.running_replicas(settings) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} engine replicas did not run within {timeout_s} s")
        time.sleep(0.2)


def replica_records(settings: Settings, *, tries: int = 200, complete: bool = False) -> dict[str, ReplicaRecord]:
    """Every running replica's record (calls are routed at random, so ask until each has
    answered; ``complete``: raise if one has not, else the records heard, as while a killed
    replica is replaced). Safe to call from a test running an event loop: the calls run on a
    thread."""

    def gather() -> dict[str, ReplicaRecord]:
        from ray import serve
        from ray.serve.exceptions import BackPressureError

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=settings.cluster_app_name)
        want = deploy.running_replicas(settings)
        seen: dict[str, ReplicaRecord] = {}
        for _ in range(tries):
            try:
                record: ReplicaRecord = handle.record.remote().result(timeout_s=30)
            except BackPressureError:
                # These calls queue where the speech calls do: just after a test's clients hang
                # up, the queue may still count the calls being cancelled (seen in CI: 16 of 16).
                time.sleep(0.05)
                continue
            seen[record.replica_id] = record
            if len(seen) >= want:
                return seen
        if complete:
            raise TimeoutError(f"heard from {len(seen)} of {want} replicas in {tries} calls")
        return seen

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(gather).result()


def job_records(settings: Settings, *, complete: bool = False) -> list[tuple[str, JobRecord]]:
    """(replica id, job record) of every replica's jobs, oldest first (``complete``: as
    :func:`replica_records`)."""
    found = [(rid, job) for rid, rec in replica_records(settings, complete=complete).items() for job in rec.jobs]
    return sorted(found, key=lambda item: item[1].started_at)


class ClusterEngineView:
    """The fake engine's record (jobs, completed, cancelled) read from all replicas, so tests
    written against the single-process server's FakeEngine run unchanged on the cluster."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._fake = FakeEngine()

    @property
    def jobs(self) -> list[SynthesisJob]:
        return [job.job for _, job in job_records(self.settings)]

    def _ids(self, outcome: str) -> list[str]:
        return [job.job.request_id for _, job in job_records(self.settings) if job.outcome == outcome]

    @property
    def completed(self) -> list[str]:
        return self._ids("completed")

    @property
    def cancelled(self) -> list[str]:
        return self._ids("cancelled")

    def count_text_tokens(self, text: str) -> int:
        return self._fake.count_text_tokens(text)

    def speech_tokens_for(self, text: str, max_speech_tokens: int) -> int:
        return self._fake.speech_tokens_for(text, max_speech_tokens)


def kill(pid: int) -> None:
    import signal

    os.kill(pid, signal.SIGKILL)
