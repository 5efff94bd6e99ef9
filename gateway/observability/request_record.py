"""One canonical log line and the metrics of every request, from one record per request.

The request middleware (``gateway.http.request_context``) opens a :class:`RequestRecord` for
each HTTP request and makes it the :func:`current_record` (a context variable, so the
streaming body, which runs in a child task, sees the same object). Handlers fill in what only
they know (model, voice, format, input size, audio produced, a failure mid-stream); the
middleware adds what only it sees (status, first body byte, whether the response completed or
the client left) and calls :func:`finish_request`, which writes the line and feeds the metrics.

Outcomes: ``ok``, ``client_error`` (4xx), ``unauthorized`` (401), ``rejected`` (429),
``unavailable`` (503), ``timeout`` (504 or the time limit mid-stream), ``cancelled`` (the client
hung up mid-response), ``error`` (5xx, or a stream that broke after its status line).
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.engine.base import SAMPLE_RATE
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.playback import RealTimePlayer
from gateway.observability.timeline import Timeline

SPEECH_ROUTE = "/v1/audio/speech"

_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("request_record", default=None)


@dataclass(slots=True)
class RequestRecord:
    """What one request did. Handlers set the fields they know; all are optional."""

    route: str = ""
    model: str | None = None
    family: str | None = None
    """The loaded model family the requested name resolved to."""
    language: str | None = None
    ignored_controls: tuple[str, ...] = ()
    """Controls the request sent that its model family accepts and ignores."""
    voice: str | None = None
    response_format: str | None = None
    stream_format: str | None = None
    input_chars: int | None = None
    audio_samples: int = 0
    sample_rate: int = SAMPLE_RATE
    speed: float = 1.0
    """The request's playback speed (the encoder's tempo): a second of samples lasts 1/speed."""
    player: RealTimePlayer = field(default_factory=RealTimePlayer)
    """The audio as a listener in real time from the first audio would hear it (stalls)."""
    queued_s: float | None = None
    outcome: str | None = None
    """Set by a handler that knows better than the status line (e.g. a stream that failed)."""
    error: str | None = None
    encoder_failed: bool = False
    key_id: str | None = None
    """The API key's id (never the key), when the server has keys."""
    client: str | None = None
    """The client's address (``gateway.http.caller``); logged only with a refusal."""
    refused_by: str | None = None
    """The admission limit that refused the request with a 429: server, client or key."""
    timeline: Timeline | None = None
    """The first-audio timeline, when the request asked for one (``request_timeline``)."""

    @property
    def audio_seconds(self) -> float:
        return self.audio_samples / self.sample_rate if self.sample_rate else 0.0

    def mark(self, stage: str) -> None:
        """A timeline mark (nothing when the request has no timeline)."""
        if self.timeline is not None:
            self.timeline.mark(stage)

    def add_audio(self, samples: int) -> None:
        """``samples`` more of the response's audio, made now."""
        self.audio_samples += samples
        if samples and self.sample_rate:
            self.player.arrive(time.monotonic(), samples / self.sample_rate / self.speed)

    @property
    def stall_s(self) -> float:
        """Seconds a real-time listener from the first audio would have waited for more."""
        return self.player.stalled_s

    def fail(self, outcome: str, error: str) -> None:
        """Record a failure after the response started (the status line cannot say it)."""
        if self.outcome is None:
            self.outcome = outcome
            self.error = error


def open_record(route: str) -> tuple[RequestRecord, contextvars.Token[RequestRecord | None]]:
    record = RequestRecord(route=route)
    return record, _current.set(record)


def close_record(token: contextvars.Token[RequestRecord | None]) -> None:
    _current.reset(token)


def current_record() -> RequestRecord:
    """The running request's record; a detached one outside a request (direct calls, tests)."""
    record = _current.get()
    return record if record is not None else RequestRecord()


_TTS_ROUTES = ("", "/stream", "/with-timestamps", "/stream/with-timestamps")


def route_label(path: str) -> str:
    """A bounded set of labels for metrics: ids in paths must not explode cardinality."""
    if path.startswith("/v1/audio/voices/"):
        return "/v1/audio/voices/{id}"
    if path.startswith("/v1/text-to-speech/"):  # the ElevenLabs face: /v1/text-to-speech/{id}[...]
        rest = path[len("/v1/text-to-speech/") :].partition("/")[2]
        tail = f"/{rest}" if rest else ""
        return f"/v1/text-to-speech/{{id}}{tail}" if tail in _TTS_ROUTES else "other"
    if path.startswith("/v1/voices/"):
        return "/v1/voices/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path in {SPEECH_ROUTE, "/v1/audio/voices", "/v1/voices", "/v1/models", "/health", "/ready", "/metrics"}:
        return path
    return "other"


READINESS_PATHS = frozenset({"/ready", "/health"})


def outcome_of(status: int | None, *, completed: bool, disconnected: bool, record: RequestRecord) -> str:
    if record.outcome is not None:
        return record.outcome
    if status is None:
        return "cancelled" if disconnected else "error"
    if not completed:
        return "cancelled" if disconnected else "error"
    if status < 400:
        return "ok"
    return {401: "unauthorized", 429: "rejected", 503: "unavailable", 504: "timeout"}.get(
        status, "error" if status >= 500 else "client_error"
    )


def finish_request(
    record: RequestRecord,
    *,
    request_id: str,
    method: str,
    path: str,
    status: int | None,
    total_s: float,
    ttfb_s: float | None,
    completed: bool,
    disconnected: bool,
    metrics: GatewayMetrics | None,
) -> None:
    """Write the request's one log line and count it in the metrics."""
    outcome = outcome_of(status, completed=completed, disconnected=disconnected, record=record)
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": status,
        "outcome": outcome,
        "duration_ms": round(total_s * 1000, 1),
    }
    is_speech = record.model is not None  # set by the speech routes of either face only
    if is_speech:
        fields.update(
            model=record.model,
            family=record.family,
            language=record.language,
            voice=record.voice,
            format=record.response_format,
            stream_format=record.stream_format,
            input_chars=record.input_chars,
            audio_s=round(record.audio_seconds, 3),
            ttfb_ms=None if ttfb_s is None else round(ttfb_s * 1000, 1),
            stall_ms=round(record.stall_s * 1000, 1),
        )
        if record.ignored_controls:
            fields["ignored_controls"] = list(record.ignored_controls)
        if record.queued_s:
            fields["queued_ms"] = round(record.queued_s * 1000, 1)
    if record.error:
        fields["error"] = record.error
    if record.key_id:
        fields["key_id"] = record.key_id
    if record.refused_by:
        fields.update(limit=record.refused_by, client=record.client)
    if record.timeline is not None:
        fields["timeline"] = record.timeline.as_json()
    log = structlog.get_logger("gateway.access")
    if outcome in {"error", "timeout"}:
        log.error("request", **fields)
    elif outcome in {"ok", "cancelled"}:
        log.info("request", **fields)
    elif outcome == "unavailable" and path in READINESS_PATHS:
        # the expected answer while the engine loads, polled every few seconds by load
        # balancers and the playground: engine_loading / engine_ready already tell the story
        log.debug("request", **fields)
    else:
        log.warning("request", **fields)

    if metrics is None:
        return
    metrics.requests.labels(route=route_label(path), outcome=outcome).inc()
    if record.encoder_failed:
        metrics.encoder_failures.labels(format=record.response_format or "unknown").inc()
    if is_speech and status == 200:
        metrics.observe_speech(
            stream_format=record.stream_format or "audio",
            ttfb_s=ttfb_s,
            total_s=total_s,
            audio_s=record.audio_seconds,
            input_chars=record.input_chars or 0,
            stall_s=record.stall_s,
        )
