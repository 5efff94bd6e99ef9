"""The narrow interface between the HTTP layer and a speech engine.

The HTTP layer only ever sees :class:`Engine`: it hands over a :class:`SynthesisJob` (text
already normalised and split, voice already resolved to immutable conditionals, per-request
controls) and iterates :class:`AudioChunk` objects as the engine produces them. Closing the
iterator early (``aclose()``, which Litestar's streaming response does when the client hangs
up) is how a request is cancelled: the engine must then drop all work for that job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from gateway.models.families import ORIGINAL
from gateway.observability.timeline import Timeline

SAMPLE_RATE = 24_000
SPEECH_TOKENS_PER_SECOND = 25


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Per-request controls, already validated by the HTTP layer."""

    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    seed: int | None = None
    max_speech_tokens: int = 1000
    """Upper bound on speech tokens generated for each text chunk."""


@dataclass(frozen=True, slots=True)
class Voice:
    """A resolved voice: its public name, its content key and its conditionals.

    ``conditionals`` is engine-specific and immutable once built (shared by every request
    that uses the voice); ``key`` is the cache key it was computed under.
    """

    name: str
    key: str
    conditionals: Any


@dataclass(frozen=True, slots=True)
class SynthesisJob:
    request_id: str
    chunks: tuple[str, ...]
    voice: Voice
    params: GenerationParams = field(default_factory=GenerationParams)
    model: str = ORIGINAL
    """The model family (registry id) to speak with: one of the engine's ``models``."""
    language: str = "en"
    """ISO 639-1, already validated against the family's languages."""
    streaming: bool = False
    """True when the client reads the audio as it is produced (favour a fast first chunk)."""
    trace: Timeline | None = field(default=None, compare=False)
    """The request's first-audio timeline (None unless it asked for one): engines mark their
    stages in it (``gateway.observability.timeline``)."""


@dataclass(frozen=True, slots=True)
class AudioChunk:
    samples: np.ndarray
    """float32 mono samples in [-1, 1] at the engine's sample rate."""
    speech_tokens: int
    """Speech tokens this audio was made from (for usage accounting)."""


EngineState = Literal["loading", "ready", "failed", "closed"]
"""The engine's lifecycle as the server sees it; kept in one place, ``AppServices.engine_state``."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Counters of an engine that batches work of many requests (the vLLM engine's vocoder),
    read by the metrics layer at each scrape. Monotonic except ``rows_per_batch``'s shape."""

    batches: int = 0
    """Batched calls made."""
    rows: int = 0
    """Work items (token windows) in those calls."""
    rows_dropped: int = 0
    """Work items dropped because their request was cancelled."""
    busy_s: float = 0.0
    """Seconds spent computing."""
    audio_s: float = 0.0
    """Seconds of audio produced."""
    rows_per_batch: dict[int, int] = field(default_factory=dict)
    """Histogram: batch size -> batches of that size."""
    flow_frames: int = 0
    """Mel frames the flow solved (each window's voice prompt included, padding not): over
    ``audio_s``, what the window schedule costs per audio-second (one-shot: ~100)."""
    whole_windows: int = 0
    """Streamed utterances vocoded as one window (T3 had finished them before the vocoder
    planned their first window)."""
    cfm_frames: int = 0
    """Mel frames of real rows the flow's CFM solves computed."""
    cfm_solved_frames: int = 0
    """The frames those solves computed, padding included (CUDA graphs run at their captured
    widths and row counts): ``1 - cfm_frames / cfm_solved_frames`` is the padding's share."""
    cfm_eager_frames: int = 0
    """Of ``cfm_frames``, those solved outside a CUDA graph (on a GPU: solves no captured graph
    holds, each launching its kernels one by one from the vocoder's thread)."""
    hift_frames: int = 0
    """Mel frames of real rows HiFT vocoded."""
    hift_eager_frames: int = 0
    """Of ``hift_frames``, those vocoded outside a CUDA graph (final and filled windows: their
    lengths vary)."""
    device_busy_s: float = 0.0
    """Seconds the device spent on those calls (its busy share over a span of wall time)."""
    t3_pauses: int = 0
    """Times T3 was held for a batch with first windows (``t3_first_window_pause_ms``)."""
    t3_paused_s: float = 0.0
    """Seconds T3's engine thread waited in those holds."""
    t3_steps: int = 0
    """Steps T3's engine took in this process's thread (``vllm_engine_core = thread``; 0 with
    an engine-core process)."""
    t3_step_s: float = 0.0
    """Wall seconds of those steps (vLLM's step and the hand-out of its outputs)."""
    t3_step_cpu_s: float = 0.0
    """CPU seconds the engine thread used in them: the rest of the wall time it waited for
    the GPU or for the GIL."""
    watermark_passes: int = 0
    """Batched watermark passes (every stream's queued windows in one)."""
    watermark_rows: int = 0
    """Windows those passes watermarked."""
    watermark_busy_s: float = 0.0
    """Seconds the watermark's worker spent in passes (its busy share: one worker, in series
    behind the vocoder: at 1.0 it bounds the engine's audio-seconds per second)."""


@dataclass(slots=True)
class T3Stats:
    """One model's T3 (speech token) requests as the engine sees them, read by the metrics
    layer at each scrape: where requests wait under load (for their first token: the T3
    engine's queue and prefill) and how fast the decoding ones get tokens. An engine keeps one
    per model up to date (on its event loop, or under a lock where worker threads count) and
    hands out copies."""

    waiting: int = 0
    """Requests sent to T3 whose first token has not come yet."""
    decoding: int = 0
    """Requests that have had a first token and are still generating."""
    requests: int = 0
    """Requests sent to T3 (monotonic)."""
    tokens: int = 0
    """Speech tokens T3 delivered (monotonic)."""
    deliveries: int = 0
    """Token deliveries (monotonic): ``tokens / deliveries`` is the tokens each hand-off
    carries (1 when every step is delivered alone; more when steps are merged or grouped)."""

    def request(self) -> T3Request:
        """Count a request sent now; its handle counts its deliveries and its end."""
        self.requests += 1
        self.waiting += 1
        return T3Request(self)


class T3Request:
    """One request in its model's :class:`T3Stats`: waiting until its first delivery, then
    decoding until :meth:`end` (call it once the request is over, however it ended)."""

    __slots__ = ("_stats", "_state")

    def __init__(self, stats: T3Stats) -> None:
        self._stats = stats
        self._state = "waiting"

    def delivered(self, tokens: int) -> None:
        stats = self._stats
        if self._state == "waiting":
            stats.waiting -= 1
            stats.decoding += 1
            self._state = "decoding"
        stats.tokens += tokens
        stats.deliveries += 1

    def end(self) -> None:
        if self._state == "waiting":
            self._stats.waiting -= 1
        elif self._state == "decoding":
            self._stats.decoding -= 1
        self._state = "ended"


@runtime_checkable
class Engine(Protocol):
    """What the server needs of an engine. Subclass it to inherit the defaults of the optional
    parts (:meth:`check_health`, :meth:`batch_stats`, :meth:`t3_stats`)."""

    name: str
    """Implementation name: "reference", "vllm" or "fake"."""
    model_id: str
    """Identity of the loaded model and weights (of the first family loaded)."""
    sample_rate: int
    models: tuple[str, ...]
    """The model families loaded (registry ids); a job names one of them."""

    async def start(self) -> None:
        """Load weights and warm up. Slow; runs in the app lifespan, never at import."""

    async def close(self) -> None:
        """Cancel outstanding work and release the device."""

    def weights_id(self, model: str) -> str:
        """Identity of one family's weights: voice conditionals are cached under it, as the
        families compute different conditionals from the same clip."""

    def compute_conditionals(self, clip: Path, model: str = ORIGINAL) -> Any:
        """Voice conditionals from a reference clip. Blocking: call it in a worker thread."""

    def save_conditionals(self, conditionals: Any, path: Path) -> None: ...

    def load_conditionals(self, path: Path, model: str = ORIGINAL) -> Any: ...

    def builtin_conditionals(self, model: str = ORIGINAL) -> Any | None:
        """The family checkpoint's own voice (``conds.pt``), or None when it has none."""

    def count_text_tokens(self, text: str, model: str = ORIGINAL, language: str = "en") -> int: ...

    def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        """Audio for the job's chunks, in order, as it is produced. Closing the iterator
        cancels the job."""
        ...

    async def check_health(self) -> None:
        """Return when the engine can serve, raise when it cannot (a worker process died, the
        device failed). ``gateway.server.engine_watch`` calls it every few seconds and marks
        the server not ready on the first failure. Default: healthy while the process lives."""
        return None

    def batch_stats(self) -> BatchStats | None:
        """Counters of cross-request batching for the metrics layer; None when the engine does
        not batch (the default)."""
        return None

    def t3_stats(self) -> Mapping[str, T3Stats] | None:
        """Per model, its T3 requests (:class:`T3Stats`) for the metrics layer; None when the
        engine does not report them (the default)."""
        return None
