"""What a client sees of a live server at N concurrent streams, as issue 18 defines it.

For one level, N clients each loop for ``window_s`` seconds: POST /v1/audio/speech (streamed
pcm by default, a clip voice, a 10 s utterance), read the body as it arrives, start the next
request when it ends. At the end of the window every request still running is cancelled
(the client hangs up: the server's cancellation path runs, and the level ends on time).
From the arrival times of the audio bytes:

* **steady audio-s/s**: audio that arrived between a third of the window and its end,
  divided by that span (no ramp-up, no tail). pcm/wav bytes are counted as they arrive;
  other formats cannot be counted on the client, so the server's
  ``chatterbox_audio_seconds_total`` is read at the same two moments instead.
* **first audio p50/p95** (``ttfb_*``): from sending a request to its first audio byte, over
  the requests *started* in that same steady span: a new request joining N-1 streams already
  playing. The first wave (N requests sent at the same instant) is reported apart
  (``first_wave_ttfb_*``): a burst, not the steady state.
* **RTF p50**: a completed request's time from sending to its last byte, over its audio's
  duration.
* **errors**: non-200s (429s included: the admission bounds are set for the peak), broken or
  truncated streams, time-outs, and pcm/wav bodies whose length is not a whole number of
  speech tokens or not exactly ``expect_samples`` (a server with fixed lengths).
* what the server used: its process tree's RSS and the GPU's used memory (sampled every
  second; peak and end), and the vocoder's busy shares from its metrics (worker time and
  device time over the window).
* what T3 did (``t3_*``, engines that count their T3 requests): requests waiting for their
  first token (vLLM's queue and prefill) and decoding, sampled every second; tokens per second
  in the steady span, per decoding stream (25 keeps real time) and per hand-off.
* with ``timeline_log`` (``benchmark --http-timelines``): every request asks for its
  first-audio timeline, and the row gets each stage's median for the first wave, for the
  steady span and for its slowest tenth (``timeline_tail``): which stage first audio waits in
  under load, and which one its p95 waits in.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.models.families import FAMILIES
from gateway.observability.playback import RealTimePlayer
from gateway.observability.timeline import HEADER as TIMELINE_HEADER
from gateway.tools import host_probes, timeline_log
from gateway.tools.bench_server import scrape
from gateway.tools.loadtest import SAMPLES_PER_TOKEN, audio_samples
from gateway.tools.stream_client import stream_client

TEXT_10S = ("The quick brown fox jumps over the lazy dog while the gateway keeps every stream "
            "busy and the vocoder batches windows from all of them.")
SAMPLE_RATE = 24_000
MULTILINGUAL = "chatterbox-multilingual"
FIRST_WAVE_S = 0.5
"""Requests sent within this long of the row's start are its first wave."""
T3_WAITING, T3_DECODING = "chatterbox_t3_waiting_requests", "chatterbox_t3_decoding_requests"
T3_TOKENS, T3_DELIVERIES = "chatterbox_t3_tokens_total", "chatterbox_t3_token_deliveries_total"


STALL_S = 0.05
"""A player's wait longer than this counts its utterance as stalled (``stalled_share``)."""


def stall_figures(stalls: Sequence[float]) -> dict[str, float | None]:
    """A row's playback figures from its utterances' stalled seconds."""
    return {"stalled_share": round(sum(s > STALL_S for s in stalls) / len(stalls), 3) if stalls else None,
            "stall_p95_ms": ms(pct(stalls, 0.95)) if stalls else None}


@dataclass(slots=True)
class _Request:
    model: str
    sent: float
    request_id: str | None = None
    """Ours (``x-request-id``) when the row asks the server for timelines."""
    first: float | None = None
    ended: float | None = None
    samples: int = 0
    error: str | None = None
    player: RealTimePlayer = field(default_factory=RealTimePlayer)
    """A real-time player of the audio as it arrived (pcm and wav: their bytes say the seconds)."""


@dataclass(slots=True)
class _Level:
    t0: float
    requests: list[_Request] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(time, audio bytes) of every piece of body received."""
    t3: list[tuple[float, float, float]] = field(default_factory=list)
    """(time, T3 requests waiting, decoding) from the server's metrics, about every second."""


def request_body(model: str, voice: str, fmt: str, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": text, "voice": voice, "response_format": fmt}
    if model == MULTILINGUAL:
        body["language"] = "en"  # never detected: the detector is not installed everywhere
    return body


def pct(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def _one(client: httpx.AsyncClient, level: _Level, body: dict[str, Any], fmt: str,
               expect_samples: int | None, timeline: bool = False) -> None:
    req = _Request(str(body["model"]), time.perf_counter())
    headers = {}
    if timeline:
        req.request_id = f"http-{len(level.requests)}-{uuid.uuid4().hex[:8]}"
        headers = {TIMELINE_HEADER: "1", "x-request-id": req.request_id}
    level.requests.append(req)
    size = 0
    try:
        async with client.stream("POST", "/v1/audio/speech", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                req.error = f"http_{response.status_code}"
                return
            header = 44 if fmt == "wav" else 0
            async for part in response.aiter_raw():
                if not part:
                    continue
                now = time.perf_counter()
                if req.first is None:
                    req.first = now - req.sent
                audio = max(0, min(len(part), size + len(part) - header))
                size += len(part)
                level.arrivals.append((now, audio))
                if audio:
                    req.player.arrive(now, audio / (2 * SAMPLE_RATE))
    except httpx.TimeoutException:
        req.error = "timeout"
        return
    except httpx.RemoteProtocolError:
        req.error = "truncated"
        return
    except httpx.TransportError as exc:
        req.error = f"transport_{type(exc).__name__}"
        return
    req.ended = time.perf_counter()
    samples = audio_samples(fmt, size)
    if size == 0:
        req.error = "empty_body"
    elif samples is not None:
        req.samples = samples
        if expect_samples and req.model in FAMILIES:  # Turbo's utterances end on its silence tokens
            expect_samples += SAMPLES_PER_TOKEN * FAMILIES[req.model].silence_tail_tokens
        if samples % SAMPLES_PER_TOKEN or (expect_samples and samples != expect_samples):
            req.error = "audio_length"


async def measure_level(base: str, models: Sequence[str], *, window_s: float, voice: str, fmt: str = "pcm",
                        text: str = TEXT_10S, expect_samples: int | None = None, server_pid: int | None = None,
                        request_timeout_s: float = 300.0, label: str | None = None,
                        profile: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                        timeline_log: Path | None = None) -> dict[str, Any]:
    """One row: ``len(models)`` concurrent looping clients, client ``i`` asking for ``models[i]``;
    the row's ``model`` is ``label`` (default: the one model, or ``mixed``). ``profile``: run
    once the steady part of the window begins (py-spy samples of the server and this client,
    ``benchmark --http-py-spy-s``); its result is the row's ``py_spy``. ``server_pid``: the
    server's process; should it die, the row ends at once (its clients would only collect
    connection errors) with ``server_died_at_s``. ``timeline_log``: the
    log of a server started with ``request_timeline``; every request asks for its first-audio
    timeline, and the row gets the stage medians of the first wave's, of the steady span's and
    of its slowest tenth's requests that had audio (``timeline_first_wave``, ``timeline_steady``,
    ``timeline_tail``): where first audio waits under load."""
    before = await asyncio.to_thread(scrape, base)
    peaks = {"rss": 0, "gpu": 0}
    async with contextlib.AsyncExitStack() as stack:
        # made before the clock starts: the first wave's requests leave together
        streams = [await stack.enter_async_context(stream_client(base, request_timeout_s)) for _ in models]
        level = _Level(time.perf_counter())
        end = level.t0 + window_s
        steady_from = level.t0 + window_s / 3
        marks: dict[str, dict[str, float]] = {}

        async def loop(client: httpx.AsyncClient, model: str) -> None:
            body = request_body(model, voice, fmt, text)
            while time.perf_counter() < end:
                await _one(client, level, body, fmt, expect_samples, timeline_log is not None)

        async def sample() -> None:
            while True:
                rss, gpu = await asyncio.to_thread(_memory, server_pid)
                peaks["rss"], peaks["gpu"] = max(peaks["rss"], rss or 0), max(peaks["gpu"], gpu or 0)
                scraped = await asyncio.to_thread(scrape, base)
                if T3_WAITING in scraped:
                    level.t3.append((time.perf_counter(), scraped[T3_WAITING], scraped.get(T3_DECODING, 0.0)))
                await asyncio.sleep(1.0)

        async def metrics_at(name: str, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            marks[name] = await asyncio.to_thread(scrape, base)

        profiled: dict[str, Any] = {}

        async def profile_at(at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            profiled.update(await profile())  # type: ignore[misc]

        clients = [asyncio.create_task(loop(client, m)) for client, m in zip(streams, models)]
        helpers = [asyncio.create_task(sample()), asyncio.create_task(metrics_at("steady", steady_from))]
        sampler = asyncio.create_task(profile_at(steady_from)) if profile is not None else None
        died: list[float] = []
        if server_pid is not None:  # the window, or less when the server dies
            watcher = asyncio.create_task(host_probes.exited(server_pid))
            await asyncio.wait([watcher], timeout=max(0.0, end - time.perf_counter()))
            if watcher.done():
                died.append(round(time.perf_counter() - level.t0, 1))
            helpers.append(watcher)
        else:
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
        if not died:
            marks["end"] = await asyncio.to_thread(scrape, base)
        for task in clients + helpers:
            task.cancel()
        await asyncio.gather(*clients, *helpers, return_exceptions=True)
        if sampler is not None:
            if died:
                sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler  # the caller sizes it to end inside the window
    rss, gpu = await asyncio.to_thread(_memory, server_pid)
    row = _row(level, models, window_s, fmt, voice, before, marks, rss, gpu, peaks, label)
    if died:
        row["server_died_at_s"] = died[0]
    if profile is not None:
        row["py_spy"] = profiled
    if timeline_log is not None:
        row.update(await asyncio.to_thread(_timelines, level, window_s, timeline_log))
    return row


TAIL_Q = 0.9
"""``timeline_tail``: the steady requests whose first audio took at least this quantile of the
row's (the tail that sets ``ttfb_p95_ms``)."""


def _timelines(level: _Level, window_s: float, log: Path, wait_s: float = 15.0) -> dict[str, Any]:
    """The stage medians (``timeline_log.summarise``, T3's per-token stages compacted) of the
    requests that had audio: those of the first wave, those started in the steady span, and of
    these the slowest tenth to first audio (``timeline_tail``: which stage the p95 waits in)."""
    steady_from, end = level.t0 + window_s / 3, level.t0 + window_s
    steady = [r for r in level.requests if r.sent >= steady_from]
    measured = [(r, r.first) for r in steady if r.first is not None and r.sent + r.first <= end]  # as ttfb_p95_ms
    tail_from = pct([first for _, first in measured], TAIL_Q)
    groups = {
        "timeline_first_wave": [r for r in level.requests if r.sent - level.t0 < FIRST_WAVE_S],
        "timeline_steady": steady,
        "timeline_tail": [r for r, first in measured if tail_from is not None and first >= tail_from],
    }
    wanted = {name: [r.request_id for r in reqs if r.request_id and r.first is not None]
              for name, reqs in groups.items()}
    found = timeline_log.read_timelines(log, [i for ids in wanted.values() for i in ids], wait_s)
    return {name: timeline_log.compact(timeline_log.summarise([found[i] for i in ids if i in found]))
            for name, ids in wanted.items()}


def _memory(pid: int | None) -> tuple[int | None, int | None]:
    return (host_probes.tree_rss_bytes(pid) if pid else None), host_probes.gpu_used_bytes()


def _row(level: _Level, models: Sequence[str], window_s: float, fmt: str, voice: str,
         before: dict[str, float], marks: dict[str, dict[str, float]], rss: int | None, gpu: int | None,
         peaks: dict[str, int], label: str | None = None) -> dict[str, Any]:
    t0, steady_from, end = level.t0, level.t0 + window_s / 3, level.t0 + window_s
    span = end - steady_from
    reqs = level.requests
    done = [r for r in reqs if r.ended is not None and r.ended <= end]
    errors = Counter(r.error for r in reqs if r.error)
    steady_ttfb = [r.first for r in reqs if r.first is not None and r.sent >= steady_from and r.sent + r.first <= end]
    first_wave = [r.first for r in reqs if r.first is not None and r.sent - t0 < FIRST_WAVE_S]
    rtf = [(r.ended - r.sent) / (r.samples / SAMPLE_RATE) for r in done if r.samples and not r.error]
    bytes_per_s = 2 * SAMPLE_RATE
    if fmt in ("pcm", "wav"):
        steady = sum(b for t, b in level.arrivals if steady_from <= t <= end) / bytes_per_s / span
        whole = sum(b for t, b in level.arrivals if t <= end) / bytes_per_s / window_s
    else:  # the server's count, at the same two moments
        audio = "chatterbox_audio_seconds_total"
        steady = (marks.get("end", {}).get(audio, 0.0) - marks.get("steady", {}).get(audio, 0.0)) / span
        whole = (marks.get("end", {}).get(audio, 0.0) - before.get(audio, 0.0)) / window_s
    kinds = sorted(set(models))
    row: dict[str, Any] = {
        "model": label or (kinds[0] if len(kinds) == 1 else "mixed"),
        "concurrency": len(models),
        "ttfb_p50_ms": ms(pct(steady_ttfb, 0.5)),
        "ttfb_p95_ms": ms(pct(steady_ttfb, 0.95)),
        "steady_audio_s_per_s": round(steady, 2),
        "rtf_p50": None if not rtf else round(pct(rtf, 0.5), 4),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "format": fmt,
        "voice": voice,
        "window_s": window_s,
        "requests_started": len(reqs),
        "requests_completed": len(done),
        "requests_cancelled_at_end": sum(1 for r in reqs if r.ended is None and r.error is None),
        "ttfb_samples": len(steady_ttfb),
        "first_wave_ttfb_p50_ms": ms(pct(first_wave, 0.5)),
        "first_wave_ttfb_p95_ms": ms(pct(first_wave, 0.95)),
        # pcm and wav: a player starting at each completed request's first byte, in real time
        **stall_figures([r.player.stalled_s for r in done if not r.error] if fmt in ("pcm", "wav") else []),
        "window_audio_s_per_s": round(whole, 2),
        "server_tree_rss_mib": host_probes.mib(rss),
        "server_tree_rss_peak_mib": host_probes.mib(peaks["rss"] or None),
        "gpu_used_mib": host_probes.mib(gpu),
        "gpu_used_peak_mib": host_probes.mib(peaks["gpu"] or None),
    }
    if row["model"] == "mixed":
        row["models"] = dict(Counter(models))
    end_metrics = marks.get("end", {})
    for name, key in (("vocoder_busy_share", "chatterbox_vocoder_busy_seconds_total"),
                      ("vocoder_device_busy_share", "chatterbox_vocoder_device_busy_seconds_total"),
                      ("watermark_busy_share", "chatterbox_watermark_busy_seconds_total")):
        if key in end_metrics and key in before:
            row[name] = round((end_metrics[key] - before[key]) / window_s, 3)

    def delta(counter: str) -> float:
        """A ``chatterbox_*_total`` counter's growth over the window (0: not reported)."""
        key = f"chatterbox_{counter}_total"
        return end_metrics.get(key, 0.0) - before.get(key, 0.0)

    batches = delta("vocoder_batches")
    if batches > 0:
        row["vocoder_rows_per_batch"] = round(delta("vocoder_windows") / batches, 1)
    audio, frames = delta("vocoder_audio_seconds"), delta("vocoder_flow_frames")
    if audio > 0 and frames > 0:  # the window schedule's cost per audio-second (one-shot: ~100)
        row["vocoder_flow_frames_per_audio_s"] = round(frames / audio, 1)
        # and what makes it: windows per audio-second (each carries the voice prompt)
        row["vocoder_windows_per_audio_s"] = round(delta("vocoder_windows") / audio, 3)
    passes = delta("watermark_passes")
    if passes > 0:
        row["watermark_rows_per_pass"] = round(delta("watermark_windows") / passes, 1)
    solved = delta("vocoder_cfm_solved_frames")
    if solved > 0:  # what the CFM graphs' widths and row counts padded the solves with
        row["vocoder_cfm_padding_share"] = round(1.0 - delta("vocoder_cfm_frames") / solved, 3)
    real = delta("vocoder_cfm_frames")
    if real > 0:  # solves no captured graph held (eager kernel launches from the vocoder's thread)
        row["vocoder_cfm_eager_share"] = round(delta("vocoder_cfm_eager_frames") / real, 3)
    hift = delta("vocoder_hift_frames")
    if hift > 0:  # HiFT calls of lengths no graph holds (final windows, filled ones)
        row["vocoder_hift_eager_share"] = round(delta("vocoder_hift_eager_frames") / hift, 3)
    pauses = delta("t3_first_window_pauses")
    if pauses > 0:  # t3_first_window_pause_ms: how often T3 waited for first windows, how long each time
        row["t3_pauses"] = int(pauses)
        row["t3_pause_mean_ms"] = round(delta("t3_first_window_paused_seconds") / pauses * 1000, 1)
    steps = delta("t3_engine_steps")
    if steps > 0:  # the engine core in a thread: its steps, their wall and CPU time (the rest: GPU or GIL waits)
        row["t3_steps_per_s"] = round(steps / window_s, 1)
        row["t3_step_ms"] = round(delta("t3_engine_step_seconds") / steps * 1000, 2)
        row["t3_step_cpu_ms"] = round(delta("t3_engine_step_cpu_seconds") / steps * 1000, 2)
    row.update(cpu_columns(before, end_metrics, window_s))
    if "chatterbox_vocoder_whole_utterance_windows_total" in end_metrics:
        row["vocoder_whole_utterance_windows"] = int(delta("vocoder_whole_utterance_windows"))
    # how late the server's event loop ran what was due, on average over the steady span
    lag, at_steady = "chatterbox_event_loop_lag_seconds", marks.get("steady", {})
    probes = end_metrics.get(f"{lag}_count", 0.0) - at_steady.get(f"{lag}_count", 0.0)
    if probes > 0:
        late = end_metrics.get(f"{lag}_sum", 0.0) - at_steady.get(f"{lag}_sum", 0.0)
        row["loop_lag_mean_ms"] = round(late / probes * 1000, 2)
    if rtf:
        row["rtf_mean"] = round(statistics.fmean(rtf), 4)
    row.update(_t3_columns(level, marks, steady_from, end))
    return row


THREAD_CPU = "chatterbox_thread_cpu_seconds"


def cpu_columns(before: dict[str, float], after: dict[str, float], window_s: float) -> dict[str, float]:
    """Cores the server process kept busy over the window (``cpu_process``) and each of its
    thread groups (``cpu_<threads>``: the event loop is ``MainThread``, T3's engine thread
    ``vllm-engine``): Python threads that together keep about one core busy wait for the GIL."""
    out: dict[str, float] = {}
    if window_s <= 0:
        return out
    if "process_cpu_seconds_total" in after and "process_cpu_seconds_total" in before:
        out["cpu_process"] = round((after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"])
                                   / window_s, 2)
    prefix = f'{THREAD_CPU}{{threads="'
    for key, value in sorted(after.items()):
        if key.startswith(prefix) and key in before:
            group = key[len(prefix):-2]
            name = "cpu_" + "".join(c if c.isalnum() else "_" for c in group)
            out[name] = round(max(0.0, value - before[key]) / window_s, 2)
    return out


def _t3_columns(level: _Level, marks: dict[str, dict[str, float]], steady_from: float, end: float
                ) -> dict[str, float]:
    """What the server's T3 counts say of the window (engines that report them): requests
    waiting for their first token (most at any sample; mean over the steady span), decoding
    ones (mean, steady), tokens per second in the steady span, and per decoding stream (25
    keeps real time; its inverse is the time a stream waits per token), tokens per hand-off."""
    out: dict[str, float] = {}
    if level.t3:
        out["t3_waiting_max"] = max(w for _, w, _ in level.t3)
    steady = [(w, d) for t, w, d in level.t3 if steady_from <= t <= end]
    if steady:
        out["t3_waiting_mean"] = round(statistics.fmean(w for w, _ in steady), 1)
        out["t3_decoding_mean"] = round(statistics.fmean(d for _, d in steady), 1)
    at, last = marks.get("steady", {}), marks.get("end", {})
    if T3_TOKENS in at and T3_TOKENS in last and end > steady_from:
        tokens = last[T3_TOKENS] - at[T3_TOKENS]
        out["t3_tokens_per_s"] = round(tokens / (end - steady_from), 1)
        if out.get("t3_decoding_mean"):
            out["t3_tokens_per_stream_s"] = round(out["t3_tokens_per_s"] / out["t3_decoding_mean"], 2)
        deliveries = last.get(T3_DELIVERIES, 0.0) - at.get(T3_DELIVERIES, 0.0)
        if deliveries > 0:
            out["t3_tokens_per_delivery"] = round(tokens / deliveries, 2)
    return out


def streams_for(model: str, concurrency: int, families: Sequence[str]) -> list[str]:
    """Which model each of ``concurrency`` streams asks for: ``mixed`` = the loaded families in
    turn (a third of the streams each for three)."""
    if model == "mixed":
        return [families[i % len(families)] for i in range(concurrency)]
    return [model] * concurrency
