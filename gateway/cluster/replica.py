"""One engine replica: the body of the Ray Serve deployment (see :mod:`gateway.cluster.deploy`).

Each replica builds one engine with the same factory as the single-process server, starts it
in the (async) constructor, and serves four calls through a Serve handle:

- ``describe()``: what the HTTP tier needs to know once (model id, sample rate, a small
  picklable text-token counter so usage is counted without a round trip).
- ``prepare_voice(ref)``: the voice's conditionals ready in the shared cache (computed by one
  replica of the cluster, loaded by the others).
- ``synthesize(job)``: a streaming generator of ``AudioChunk``. When the caller cancels (the
  client hung up), Serve cancels this generator's task: the ``CancelledError`` lands inside
  the engine's own iterator, which drops the job as it does in one process.
- ``record()``: this replica's recent jobs and their outcomes (operators and tests).

``check_health`` is Serve's replica health check: a replica whose engine reports itself dead
is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.cluster.loopback import keep_replica_grpc_on_loopback
from gateway.cluster.options import max_ongoing_requests
from gateway.cluster.voice_refs import ClipReference
from gateway.engine.base import AudioChunk, Engine, SynthesisJob, Voice
from gateway.engine.factory import build_engine
from gateway.models.families import ORIGINAL
from gateway.settings import Settings
from gateway.voices.cache import VoiceCache

EngineFactory = Callable[[Settings], Engine]
JobOutcome = Literal["running", "completed", "cancelled", "failed"]
HISTORY = 1000
"""Jobs a replica remembers (bounded: a long-running replica stays small)."""


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    replica_id: str
    pid: int
    engine: str
    model_id: str
    models: tuple[str, ...]
    """The model families the replica's engine loaded (the same settings everywhere)."""
    sample_rate: int
    has_builtin_voice: bool
    count_text_tokens: Callable[[str], int]
    max_ongoing_requests: int
    """What Serve lets this replica take at once (the deployment's option, from the same settings)."""


@dataclass(slots=True)
class JobRecord:
    job: SynthesisJob
    """As received (the voice is a ClipReference)."""
    started_at: float
    outcome: JobOutcome = "running"


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    replica_id: str
    pid: int
    jobs: list[JobRecord] = field(default_factory=list)
    conditionals_computed: int = 0
    conditionals_loaded: int = 0


def portable_token_counter(engine: Engine) -> Callable[[str], int]:
    """``engine.count_text_tokens`` as a small picklable function (a bound method would carry
    the whole engine)."""
    from gateway.engine.checkpoint.upstream_voices import UpstreamVoices
    from gateway.engine.fake import FakeEngine

    if isinstance(engine, FakeEngine):
        return len
    if isinstance(engine, UpstreamVoices):
        from gateway.engine.checkpoint.components import count_text_tokens

        return functools.partial(count_text_tokens, engine._ready().tokenizer)
    raise TypeError(f"the {engine.name} engine has no text-token counter that can leave its replica")


class EngineReplica:
    async def __init__(self, settings: dict[str, Any], engine_factory: EngineFactory | None = None) -> None:
        keep_replica_grpc_on_loopback()  # before Serve starts that server, right after this
        self.settings = msgspec.convert(settings, Settings)
        self.engine = await asyncio.to_thread(engine_factory or build_engine, self.settings)
        await self.engine.start()
        self.voices = VoiceCache(
            self.engine, Path(self.settings.cache_dir) / "conditionals", self.settings.voice_cache_size
        )
        self._jobs: collections.deque[JobRecord] = collections.deque(maxlen=HISTORY)
        self._id = _replica_id()

    async def __del__(self) -> None:
        # Serve calls this when it stops the replica: release the device.
        await self.engine.close()

    def describe(self) -> ReplicaInfo:
        return ReplicaInfo(
            replica_id=self._id,
            pid=os.getpid(),
            engine=self.engine.name,
            model_id=self.engine.model_id,
            models=tuple(self.engine.models),
            sample_rate=self.engine.sample_rate,
            has_builtin_voice=self.engine.builtin_conditionals() is not None,
            count_text_tokens=portable_token_counter(self.engine),
            max_ongoing_requests=max_ongoing_requests(self.settings),
        )

    async def prepare_voice(self, ref: ClipReference, model: str = ORIGINAL) -> ClipReference:
        # errors name the clip's file: the HTTP tier knows the voice's name, not the replica
        voice = await self.voices.get(ref.info(Path(ref.clip).name if ref.clip else "default"), model)
        return dataclasses.replace(ref, sha=voice.key.rsplit(":", 1)[1] if ref.clip else None)

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        record = JobRecord(job=job, started_at=time.time())
        self._jobs.append(record)
        try:
            resolved = await self._resolve(job)
            stream = self.engine.synthesize(resolved)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()  # a no-op when cancellation already ended it
            record.outcome = "completed"
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome = "cancelled"
            raise
        except BaseException:
            record.outcome = "failed"
            raise

    async def _resolve(self, job: SynthesisJob) -> SynthesisJob:
        ref = job.voice.conditionals
        if not isinstance(ref, ClipReference):
            raise TypeError(f"a job's voice must arrive as a ClipReference, got {type(ref).__name__}")
        voice = await self.voices.get(ref.info(job.voice.name), job.model)
        return dataclasses.replace(job, voice=Voice(name=job.voice.name, key=voice.key, conditionals=voice.conditionals))

    async def check_health(self) -> None:
        await self.engine.check_health()

    def record(self) -> ReplicaRecord:
        return ReplicaRecord(
            replica_id=self._id,
            pid=os.getpid(),
            jobs=list(self._jobs),
            conditionals_computed=self.voices.computed,
            conditionals_loaded=self.voices.disk_hits,
        )


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a direct construction): the process is the identity
        return f"pid-{os.getpid()}"
