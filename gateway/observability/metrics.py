"""Prometheus metrics, one registry per app (tests build many apps in one process).

What an operator needs to see the server's health under load: requests by outcome, work in
flight and queued (read live from the admission controller), time to first byte and
real-time factor (synthesis seconds per audio second) histograms, audio produced, encoder
failures, engine batch sizes, and the process's own memory/CPU (``process_*``, which the
load test also reads) and, once CUDA is in use, its CUDA allocator (``cuda_*``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from gateway.engine.base import Engine
from gateway.observability.thread_cpu import thread_cpu_seconds

NAMESPACE = "chatterbox"

# Seconds: a first byte under ~100 ms is great, over 10 s is a problem worth seeing.
TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Real-time factor: < 1 means faster than real time.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _LiveGauges(Collector):
    """Gauges whose values are read at scrape time from callables (admission, engine)."""

    def __init__(self, sources: Callable[[], Mapping[str, tuple[str, float]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (doc, value) in self._sources().items():
            yield GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)


class _AdmissionRefusals(Collector):
    """429s by the admission limit that refused them (read at scrape time)."""

    LIMITS = ("server", "client", "key")

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        counts = self._counts()
        family = CounterMetricFamily(
            f"{NAMESPACE}_admission_refusals",
            "Speech requests refused with 429 by limit: server (all slots and the queue full), "
            "client or key (that client or API key held its share).",
            labels=["limit"],
        )
        for limit in self.LIMITS:
            family.add_metric([limit], float(counts.get(limit, 0)))
        yield family


class _EngineCollector(Collector):
    """What an engine reports, read at each scrape from the engine loaded then (if any)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Any]:
        return []  # the families depend on the engine loaded later


class _BatchStats(_EngineCollector):
    """An engine's cross-request batching counters (``Engine.batch_stats()``, e.g. the vLLM
    engine's vocoder loop), read at scrape time; absent for engines that do not batch."""

    def collect(self) -> Iterable[Any]:
        engine = self._engine()
        stats = engine.batch_stats() if engine is not None else None
        if stats is None:
            return
        sizes = dict(stats.rows_per_batch)
        buckets = []
        for bound in BATCH_BUCKETS:
            buckets.append((str(float(bound)), float(sum(n for size, n in sizes.items() if size <= bound))))
        buckets.append(("+Inf", float(sum(sizes.values()))))
        yield HistogramMetricFamily(
            f"{NAMESPACE}_engine_batch_size",
            "Token windows per batched vocoder (S3Gen) call.",
            buckets=buckets,
            sum_value=float(sum(size * n for size, n in sizes.items())),
        )
        counters = {
            "vocoder_batches": ("Batched vocoder calls.", stats.batches),
            "vocoder_windows": ("Token windows vocoded.", stats.rows),
            "vocoder_windows_dropped": ("Windows dropped because their stream was cancelled.", stats.rows_dropped),
            "vocoder_busy_seconds": ("Seconds the vocoder worker spent computing.", stats.busy_s),
            "vocoder_device_busy_seconds": ("Seconds the device ran vocoder batches (CUDA events).",
                                            stats.device_busy_s),
            "vocoder_audio_seconds": ("Seconds of audio the vocoder produced.", stats.audio_s),
            "vocoder_flow_frames": ("Mel frames the vocoder's flow solved, voice prompts included "
                                    "(over audio seconds: the window schedule's cost).", stats.flow_frames),
            "vocoder_whole_utterance_windows": ("Streamed utterances vocoded as one window (T3 had "
                                                "finished them when the vocoder got to them).",
                                                stats.whole_windows),
            "vocoder_cfm_frames": ("Mel frames of real rows the flow's CFM solves computed.", stats.cfm_frames),
            "vocoder_cfm_solved_frames": ("Mel frames the CFM solves computed, their CUDA graphs' padding "
                                          "(width and rows) included.", stats.cfm_solved_frames),
            "vocoder_cfm_eager_frames": ("Of the real rows' CFM frames, those solved outside a CUDA graph "
                                         "(no captured graph held the solve).", stats.cfm_eager_frames),
            "vocoder_hift_frames": ("Mel frames of real rows HiFT vocoded.", stats.hift_frames),
            "vocoder_hift_eager_frames": ("Of those, the frames vocoded outside a CUDA graph (final and filled "
                                          "windows: their lengths vary).", stats.hift_eager_frames),
            "t3_first_window_pauses": ("Times T3 was held while a vocoder batch with first windows ran.",
                                       stats.t3_pauses),
            "t3_first_window_paused_seconds": ("Seconds T3 waited in those holds.", stats.t3_paused_s),
            "t3_engine_steps": ("Steps of T3's engine in this process's thread (engine core in a thread).",
                                stats.t3_steps),
            "t3_engine_step_seconds": ("Wall seconds of those steps.", stats.t3_step_s),
            "t3_engine_step_cpu_seconds": ("CPU seconds the engine thread used in them (the rest of their wall "
                                           "time it waited: for the GPU or the GIL).", stats.t3_step_cpu_s),
            "watermark_passes": ("Batched watermark passes.", stats.watermark_passes),
            "watermark_windows": ("Windows the batched watermark passes marked.", stats.watermark_rows),
            "watermark_busy_seconds": ("Seconds the watermark's worker spent in passes (one worker: at a busy "
                                       "share of 1 it bounds the engine's throughput).", stats.watermark_busy_s),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{NAMESPACE}_{name}", doc, value=float(value))


class _T3Stats(_EngineCollector):
    """The engine's T3 requests per model (``Engine.t3_stats()``), read at scrape time; absent
    for engines that do not report them. Under load, ``t3_waiting_requests`` says whether
    requests queue before T3 (vLLM's scheduler, its prefill), and the token counter over the
    decoding gauge says each stream's tokens per second (25 keeps real time)."""

    GAUGES = {
        "waiting": ("t3_waiting_requests", "T3 requests sent and waiting for their first speech token."),
        "decoding": ("t3_decoding_requests", "T3 requests generating speech tokens."),
    }
    COUNTERS = {
        "requests": ("t3_requests", "T3 requests sent, by model."),
        "tokens": ("t3_tokens", "Speech tokens T3 delivered, by model."),
        "deliveries": ("t3_token_deliveries",
                       "Hand-offs of speech tokens from T3 (tokens per hand-off: tokens over these)."),
    }

    def collect(self) -> Iterable[Any]:
        engine = self._engine()
        stats = engine.t3_stats() if engine is not None else None
        if not stats:
            return
        for field, (name, doc) in self.GAUGES.items():
            gauge = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["model"])
            for model, st in stats.items():
                gauge.add_metric([model], float(getattr(st, field)))
            yield gauge
        for field, (name, doc) in self.COUNTERS.items():
            counter = CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["model"])
            for model, st in stats.items():
                counter.add_metric([model], float(getattr(st, field)))
            yield counter


class _ConnectionStats(Collector):
    """The connection guard's gauges and counters (``ConnectionLimits.stats()``), read at scrape
    time; absent when the app runs without the guarded server (in process)."""

    def __init__(self, stats: Callable[[], Mapping[str, tuple[str, str, float]] | None]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Any]:
        return []  # known only once a server has started

    def collect(self) -> Iterable[Any]:
        for name, (kind, doc, value) in (self._stats() or {}).items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"{NAMESPACE}_{name}", doc, value=float(value))


class _CudaMemory(Collector):
    """This process's CUDA caching allocator, read at scrape time: what tensors hold
    (``allocated``) and what the allocator keeps from the driver (``reserved``). Absent until
    something in the process has initialised CUDA (never imports torch itself), so CPU servers
    show nothing. With the GPU's total from the driver (and vLLM's engine-core process apart),
    a load test can tell a leak (allocated grows) from a pool that grows (reserved only)."""

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        allocated = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
        reserved = sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))
        yield GaugeMetricFamily(f"{NAMESPACE}_cuda_allocated_bytes",
                                "Bytes of CUDA memory this process's tensors hold (all devices).", value=float(allocated))
        yield GaugeMetricFamily(f"{NAMESPACE}_cuda_reserved_bytes",
                                "Bytes of CUDA memory this process's caching allocator holds (all devices).",
                                value=float(reserved))


class _ThreadCpu(Collector):
    """CPU seconds by thread group (:mod:`gateway.observability.thread_cpu`), read at scrape
    time: over a window, each group's cores kept busy (the GIL's share among them)."""

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        groups = thread_cpu_seconds()
        if not groups:
            return
        family = GaugeMetricFamily(
            f"{NAMESPACE}_thread_cpu_seconds",
            "CPU seconds used so far by this process's live Python threads, by thread name (a pool's "
            "workers together); 'other': native threads and ended ones.", labels=["threads"])
        for group, seconds in sorted(groups.items()):
            family.add_metric([group], seconds)
        yield family


class GatewayMetrics:
    """All metrics of one app. ``live`` returns ``{name: (help, value)}`` read at each scrape."""

    def __init__(
        self,
        live: Callable[[], Mapping[str, tuple[str, float]]] | None = None,
        engine: Callable[[], Engine | None] | None = None,
        refusals: Callable[[], Mapping[str, int]] | None = None,
        connections: Callable[[], Mapping[str, tuple[str, str, float]] | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        if live is not None:
            self.registry.register(_LiveGauges(live))
        if refusals is not None:
            self.registry.register(_AdmissionRefusals(refusals))
        if engine is not None:
            self.registry.register(_BatchStats(engine))
            self.registry.register(_T3Stats(engine))
        if connections is not None:
            self.registry.register(_ConnectionStats(connections))
        self.registry.register(_CudaMemory())
        self.registry.register(_ThreadCpu())
        r = self.registry
        self.requests = Counter(
            f"{NAMESPACE}_requests", "HTTP requests by route and outcome.", ["route", "outcome"], registry=r
        )
        self.ttfb = Histogram(
            f"{NAMESPACE}_time_to_first_byte_seconds",
            "Speech requests: seconds from request start to the first audio byte sent.",
            ["stream_format"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{NAMESPACE}_request_duration_seconds",
            "Speech requests: seconds from request start to the last byte.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            f"{NAMESPACE}_real_time_factor",
            "Speech requests: wall seconds per second of audio produced (< 1: faster than real time).",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.stall = Histogram(
            f"{NAMESPACE}_stream_stall_seconds",
            "Speech requests: seconds a listener playing the audio in real time from its first audio would have "
            "waited for more (0: smooth).",
            buckets=STALL_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            f"{NAMESPACE}_event_loop_lag_seconds",
            "How late the event loop woke a task that slept (loop_lag_probe_s apart): what every await waited.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(f"{NAMESPACE}_audio_seconds", "Seconds of audio produced.", registry=r)
        self.input_chars = Counter(f"{NAMESPACE}_input_characters", "Characters of input text accepted.", registry=r)
        self.encoder_failures = Counter(
            f"{NAMESPACE}_encoder_failures", "FFmpeg encoder failures by output format.", ["format"], registry=r
        )
        # --- the ElevenLabs face's WebSockets (gateway.http.elevenlabs) ---
        self.websockets = Counter(
            f"{NAMESPACE}_websockets", "Text-to-speech WebSockets closed, by endpoint and outcome.",
            ["endpoint", "outcome"], registry=r,
        )
        self.websocket_contexts = Counter(
            f"{NAMESPACE}_websocket_contexts", "Speech contexts of those sockets ended, by endpoint and outcome.",
            ["endpoint", "outcome"], registry=r,
        )
        self.websocket_first_audio = Histogram(
            f"{NAMESPACE}_websocket_first_audio_seconds",
            "WebSocket contexts: seconds from the first text chunk cut to its first audio sent.",
            buckets=TTFB_BUCKETS,
            registry=r,
        )

    def observe_speech(
        self,
        *,
        stream_format: str,
        ttfb_s: float | None,
        total_s: float,
        audio_s: float,
        input_chars: int,
        stall_s: float = 0.0,
    ) -> None:
        """One finished speech request that produced a response (any outcome)."""
        if ttfb_s is not None:
            self.ttfb.labels(stream_format=stream_format).observe(ttfb_s)
        self.duration.observe(total_s)
        self.input_chars.inc(input_chars)
        if audio_s > 0:
            self.stall.observe(stall_s)
            self.audio_seconds.inc(audio_s)
            self.rtf.observe(total_s / audio_s)

    def add_gauges(self, live: Callable[[], Mapping[str, tuple[str, float]]]) -> None:
        """More gauges read at each scrape (``{name: (help, value)}``), e.g. open WebSockets."""
        self.registry.register(_LiveGauges(live))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def service_gauges(services: Any) -> dict[str, tuple[str, float]]:
    """Live values of an app's services (``gateway.server.services.AppServices``) for the scrape."""
    admission = services.admission
    values: dict[str, tuple[str, float]] = {
        "in_flight_requests": ("Speech requests admitted and not yet finished.", float(admission.in_flight)),
        "queued_requests": ("Speech requests waiting for an admission slot.", float(admission.queued)),
        "max_in_flight_requests": ("Configured admission limit (max_in_flight).", float(admission.max_in_flight)),
        "engine_ready": ("1 while the engine is loaded and healthy, else 0.", 1.0 if services.engine_state == "ready" else 0.0),
    }
    return values
