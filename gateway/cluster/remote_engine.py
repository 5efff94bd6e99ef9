"""The HTTP tier's engine in cluster mode: the ``Engine`` protocol over a Ray Serve handle.

The server's request path (validation, voices, text, admission, encoding, the OpenAI
contract) is the same code as in one process; only the engine behind it is remote:

- ``synthesize`` is a streaming handle call: each ``AudioChunk`` leaves the replica as it is
  produced. Closing the iterator (client gone) cancels the call, and Serve cancels the
  replica's generator, which drops the job.
- Serve routes each call to the less loaded of two replicas. This process keeps at most
  (running replicas x ``max_ongoing_requests`` + ``cluster_max_queued_requests``) calls
  open; past that a call is refused at once: a 429 with Retry-After, like the server's own
  admission. (Serve's own bound on waiting calls, the same ``cluster_max_queued_requests``,
  is set too, but it counts only calls it has not yet tried to place, so a full tier can
  hold more than it says; several HTTP processes share the replicas, and Serve's bound is
  what stops them together.)
- A replica that dies fails the streams it was serving (``EngineError``: an SSE error event
  or a chunked body closed early). A call that had produced nothing yet is tried once more,
  on another replica.
- Voice conditionals stay on the replicas; this side caches a ``ClipReference`` (see
  :mod:`gateway.cluster.voice_refs`), under its own ``model_id`` namespace.
- ``check_health`` passes while at least one replica runs; when none does, it says what
  the replicas are doing (Serve replaces a replica that died: STARTING, RECOVERING).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.cluster import deploy
from gateway.cluster.handle_router import stop_handle_router
from gateway.cluster.options import check_cluster_settings
from gateway.cluster.replica import EngineFactory, ReplicaInfo
from gateway.cluster.voice_refs import ClipReference, load_ref, save_ref
from gateway.engine.base import AudioChunk, Engine, SynthesisJob
from gateway.errors import EngineError, EngineUnavailableError, GatewayError, OverloadedError
from gateway.models.families import ORIGINAL
from gateway.settings import Settings

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

ATTEMPTS = 2
"""Tries of a call whose replica died before it produced anything."""
CALL_TIMEOUT_S = 600.0
"""Bound on one blocking call to a replica (a voice's first conditionals on a busy CPU)."""


class ReplicaLostError(Exception):
    """The replica serving a call died or became unreachable."""


class RemoteEngine(Engine):
    sample_rate: int

    def __init__(self, settings: Settings, *, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        """What replicas build (default: gateway.engine.factory.build_engine); used when deploying."""
        self.name = "cluster"
        self.model_id = "cluster"
        self.models: tuple[str, ...] = tuple(settings.models)
        self._handle: DeploymentHandle | None = None
        self._count: Callable[[str], int] = len
        self._per_replica = 1
        self._replicas = 0
        self._open_calls = 0
        self._owns_ray = False
        self._builtin = False
        self._log = structlog.get_logger("gateway.cluster")

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._handle = await asyncio.to_thread(self._connect)
        info: ReplicaInfo = await self._handle.describe.remote()
        # Its own namespace: this tier's cache holds references, the replicas' the conditionals.
        self.name = f"cluster:{info.engine}"
        self.model_id = f"cluster:{info.model_id}"
        self.models = info.models
        self.sample_rate = info.sample_rate
        self._builtin = info.has_builtin_voice
        self._count = info.count_text_tokens
        self._per_replica = info.max_ongoing_requests
        self._replicas = await asyncio.to_thread(deploy.running_replicas, self.settings)
        self._log.info("cluster_attached", app=self.settings.cluster_app_name, engine=info.engine, replicas=self._replicas)

    def _connect(self) -> DeploymentHandle:
        self._owns_ray = deploy.connect(self.settings)
        if self.settings.cluster_deploy:
            return deploy.deploy(self.settings, self.engine_factory)
        return deploy.attach(self.settings)

    async def close(self) -> None:
        # The engine tier outlives this process (other HTTP processes use it), unless this
        # process started Ray itself ("local"): then it goes with us.
        if self._owns_ray:
            await asyncio.to_thread(_shutdown_ray)

    @property
    def capacity(self) -> int:
        """Calls this process keeps open at once (running and waiting for a replica)."""
        return self._replicas * self._per_replica + self.settings.cluster_max_queued_requests

    async def check_health(self) -> None:
        # also keeps the replica count behind `capacity` current (every few seconds)
        states = await asyncio.to_thread(deploy.replica_states, self.settings)
        self._replicas = states.get("RUNNING", 0)
        if self._replicas == 0:
            raise EngineUnavailableError(replicas_down(self.settings.cluster_app_name, states))

    # --- voices: references here, conditionals on the replicas ----------------------------

    def weights_id(self, model: str) -> str:
        return self.model_id if model == self.models[0] else f"{self.model_id}/{model}"

    def compute_conditionals(self, clip: Path, model: str = ORIGINAL) -> ClipReference:
        """Blocking (called in a worker thread): one replica makes the conditionals and
        leaves them in the shared cache for all."""
        ref = ClipReference(clip=str(Path(clip).resolve()))
        return self._blocking(lambda handle: handle.prepare_voice.remote(ref, model))

    def save_conditionals(self, conditionals: Any, path: Path) -> None:
        save_ref(conditionals, path)

    def load_conditionals(self, path: Path, model: str = ORIGINAL) -> ClipReference:
        return load_ref(path)

    def builtin_conditionals(self, model: str = ORIGINAL) -> ClipReference | None:
        return ClipReference(clip=None) if self._builtin else None

    def count_text_tokens(self, text: str, model: str = ORIGINAL, language: str = "en") -> int:
        # the replicas' counter is their first family's tokenizer; other families' tokenizers
        # (GPT-2, multilingual front ends) do not travel: their usage counts characters
        return self._count(text) if model == self.models[0] else len(text)

    def _blocking(self, call: Callable[[DeploymentHandle], Any]) -> Any:
        handle = self._ready()
        for attempt in range(ATTEMPTS):
            try:
                return call(handle).result(timeout_s=CALL_TIMEOUT_S)
            except Exception as exc:
                error = gateway_error(exc)
                if not isinstance(error, ReplicaLostError) or attempt == ATTEMPTS - 1:
                    raise _public(error) from None
        raise AssertionError("unreachable")

    # --- synthesis ------------------------------------------------------------------------

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        streaming = self._ready().options(stream=True)
        if self._open_calls >= self.capacity:
            raise OverloadedError(
                f"Every engine replica is busy and {self.settings.cluster_max_queued_requests} requests "
                "already wait for one; retry shortly."
            )
        self._open_calls += 1
        call = self._call(streaming, job)
        try:
            async for chunk in call:
                yield chunk
        finally:
            try:
                await call.aclose()  # now, not at garbage collection: it cancels the replica's job
            finally:
                self._open_calls -= 1

    async def _call(self, streaming: DeploymentHandle, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        for attempt in range(ATTEMPTS):
            produced = finished = False
            stream = None
            try:
                stream = streaming.synthesize.remote(job)
                async for chunk in stream:
                    produced = True
                    yield chunk
                finished = True
                return
            except Exception as exc:
                finished = True  # the call has ended (cancel() would re-raise its error)
                error = gateway_error(exc)
                if isinstance(error, ReplicaLostError) and not produced and attempt < ATTEMPTS - 1:
                    self._log.warning("replica_lost_retrying", request_id=job.request_id, error=str(exc))
                    continue
                # from None: the error's message says what happened; Ray's frames would only
                # bloat the server's log line
                raise _public(error) from None
            finally:
                if stream is not None and not finished:
                    stream.cancel()  # the client went away or the call failed: stop the replica's job

    def _ready(self) -> DeploymentHandle:
        if self._handle is None:
            raise EngineUnavailableError("the cluster engine is not connected")
        return self._handle


def replicas_down(app: str, states: dict[str, int]) -> str:
    """What /ready says while no replica runs: that they are down, and what Serve is doing."""
    if not states:
        return f"no engine replica of '{app}' is running: the Serve application is gone (deploy it again)"
    doing = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
    return f"no engine replica of '{app}' is running (replicas down; Ray Serve is restarting them: {doing})"


def build_remote_engine(settings: Settings) -> RemoteEngine:
    """The cluster's engine for ``create_app(settings, engine=...)``, after checking that Ray
    Serve is installed and the replica bounds can be met."""
    check_cluster_settings(settings)
    return RemoteEngine(settings)


def gateway_error(exc: BaseException) -> Exception:
    """The error a Ray or Serve failure means for a request: a GatewayError raised in the
    replica travels back as itself; a lost replica is a ReplicaLostError (retryable)."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    if isinstance(exc, serve_errors.BackPressureError):
        return OverloadedError("Every engine replica is busy and the queue for them is full; retry shortly.")
    if isinstance(exc, serve_errors.DeploymentUnavailableError):
        return EngineUnavailableError("The engine deployment is unavailable (it failed to deploy).")
    if isinstance(exc, (ray_errors.RayActorError, ray_errors.ActorUnavailableError, serve_errors.ReplicaUnavailableError)):
        return ReplicaLostError(str(exc).splitlines()[0])
    if isinstance(exc, ray_errors.RayTaskError):
        cause = exc.cause
        if isinstance(cause, GatewayError):
            return cause
        return EngineError(f"The engine replica failed: {type(cause).__name__}: {cause}")
    if isinstance(exc, GatewayError):
        return exc
    return EngineError(f"The engine tier failed: {type(exc).__name__}: {exc}")


def _public(error: Exception) -> Exception:
    if isinstance(error, ReplicaLostError):
        return EngineError(f"The engine replica serving this request stopped ({error}).")
    return error


def _shutdown_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    stop_handle_router()  # Serve's shutdown leaves it running: see gateway/cluster/handle_router.py
    ray.shutdown()
