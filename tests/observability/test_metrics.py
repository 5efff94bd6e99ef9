"""Prometheus /metrics: a registry per app, counters that move with requests, histograms for
time to first byte and real-time factor, live in-flight/queue gauges, vocoder batch sizes."""

from __future__ import annotations

import asyncio

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.fake import FakeEngine
from gateway.engine.base import BatchStats, T3Stats
from gateway.settings import Settings
from harness import in_process
from ops_support import quiet_attempts

SPEECH = {"model": "tts-1", "voice": "alloy", "input": "Counting this one.", "response_format": "wav"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_and_histograms_move(settings: Settings) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        before = samples((await gw.http.get("/metrics")).text)
        assert value(before, "chatterbox_requests_total", route="/v1/audio/speech", outcome="ok") == 0
        for _ in range(2):
            assert (await gw.http.post("/v1/audio/speech", json=SPEECH)).status_code == 200
        sse = await gw.http.post("/v1/audio/speech", json={**SPEECH, "stream_format": "sse"})
        assert sse.status_code == 200
        assert (await gw.http.post("/v1/audio/speech", json={**SPEECH, "voice": "nobody"})).status_code == 400
        response = await gw.http.get("/metrics")
        # Prometheus' own content type, once (Litestar used to append a second charset)
        assert response.headers.get_list("content-type") == [CONTENT_TYPE_LATEST]
        assert response.headers["content-type"].count("charset") == 1
        after = samples(response.text)

    speech = "/v1/audio/speech"
    assert value(after, "chatterbox_requests_total", route=speech, outcome="ok") == 3
    assert value(after, "chatterbox_requests_total", route=speech, outcome="client_error") == 1
    assert value(after, "chatterbox_time_to_first_byte_seconds_count", stream_format="audio") == 2
    assert value(after, "chatterbox_time_to_first_byte_seconds_count", stream_format="sse") == 1
    assert value(after, "chatterbox_real_time_factor_count") == 3
    assert value(after, "chatterbox_request_duration_seconds_count") == 3
    # the fake speaks 0.5 token per character, 25 tokens per second
    expected_audio = 3 * round(len(SPEECH["input"]) * 0.5) / 25
    assert abs(value(after, "chatterbox_audio_seconds_total") - expected_audio) < 1e-6
    assert value(after, "chatterbox_input_characters_total") == 4 * len(SPEECH["input"]) - len(SPEECH["input"])
    assert value(after, "chatterbox_in_flight_requests") == 0
    assert value(after, "chatterbox_queued_requests") == 0
    assert value(after, "chatterbox_max_in_flight_requests") == settings.max_in_flight
    assert value(after, "chatterbox_engine_ready") == 1
    assert value(after, "process_resident_memory_bytes") > 0
    # the scrape before counted itself only once the response was done
    assert value(after, "chatterbox_requests_total", route="/metrics", outcome="ok") == 1


async def test_a_stream_that_falls_behind_real_time_is_counted_as_stalled(settings: Settings) -> None:
    """30 tokens in pieces of 10 (0.4 s of audio each), one every 0.6 s: a listener from the
    first audio hears 0.4 s, waits 0.2 s, twice (the log line's stall_ms, the histogram);
    pieces every 0.1 s play without a gap."""
    from structlog.testing import capture_logs

    body = {**SPEECH, "input": "x" * 60, "response_format": "pcm"}
    for _ in quiet_attempts():  # stall_ms is wall time: a stalled host (not the server) measures again
        with capture_logs() as logs:
            async with in_process(settings, FakeEngine(piece_delay_s=0.6)) as gw:
                assert (await gw.http.post("/v1/audio/speech", json=body)).status_code == 200
                stalled = samples((await gw.http.get("/metrics")).text)
            async with in_process(settings, FakeEngine(piece_delay_s=0.1)) as gw:
                assert (await gw.http.post("/v1/audio/speech", json=body)).status_code == 200
                smooth = samples((await gw.http.get("/metrics")).text)
    slow, quick = [e for e in logs if e["event"] == "request" and e["path"] == "/v1/audio/speech"]
    assert 350 <= slow["stall_ms"] <= 600, slow
    assert quick["stall_ms"] == 0.0, quick
    assert value(stalled, "chatterbox_stream_stall_seconds_count") == 1
    assert 0.35 <= value(stalled, "chatterbox_stream_stall_seconds_sum") <= 0.6
    assert value(stalled, "chatterbox_stream_stall_seconds_bucket", le="0.25") == 0
    assert value(smooth, "chatterbox_stream_stall_seconds_bucket", le="0.05") == 1


async def test_the_event_loops_lag_is_sampled_and_a_blocked_loop_shows_in_it(settings: Settings) -> None:
    """A probe every 20 ms; the loop blocked for 0.3 s once: one sample at least that late."""
    import time

    probed = msgspec.structs.replace(settings, loop_lag_probe_s=0.02)
    async with in_process(probed, FakeEngine()) as gw:
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # a callback that holds the loop
        await asyncio.sleep(0.1)
        scraped = samples((await gw.http.get("/metrics")).text)
    assert value(scraped, "chatterbox_event_loop_lag_seconds_count") >= 4
    assert value(scraped, "chatterbox_event_loop_lag_seconds_sum") >= 0.25
    late = value(scraped, "chatterbox_event_loop_lag_seconds_count") - value(
        scraped, "chatterbox_event_loop_lag_seconds_bucket", le="0.25")
    assert late >= 1  # the blocked wake-up, in a bucket above 0.25 s
    off = msgspec.structs.replace(settings, loop_lag_probe_s=0.0)
    async with in_process(off, FakeEngine()) as gw:
        await asyncio.sleep(0.05)
        assert value(samples((await gw.http.get("/metrics")).text), "chatterbox_event_loop_lag_seconds_count") == 0


async def test_each_app_has_its_own_registry(settings: Settings) -> None:
    async with in_process(settings, FakeEngine()) as first:
        await first.http.post("/v1/audio/speech", json=SPEECH)
        async with in_process(settings, FakeEngine()) as second:
            scraped = samples((await second.http.get("/metrics")).text)
            assert value(scraped, "chatterbox_requests_total", route="/v1/audio/speech", outcome="ok") == 0


async def test_metrics_can_be_turned_off(settings: Settings, api_error) -> None:
    async with in_process(msgspec.structs.replace(settings, metrics_enabled=False), FakeEngine()) as gw:
        api_error(await gw.http.get("/metrics"), 404)
        assert (await gw.http.post("/v1/audio/speech", json=SPEECH)).status_code == 200


class _BatchingEngine(FakeEngine):
    """A fake engine reporting batching counters, as the vLLM engine's vocoder loop does."""

    def batch_stats(self) -> BatchStats:
        return BatchStats(batches=3, rows=1 + 4 + 9, rows_dropped=2, rows_per_batch={1: 1, 4: 1, 9: 1},
                          flow_frames=4321, whole_windows=5, cfm_frames=3000, cfm_solved_frames=3600, cfm_eager_frames=120,
                          hift_frames=900, hift_eager_frames=90,
                          watermark_passes=7, watermark_rows=40,
                          watermark_busy_s=1.5, t3_pauses=6, t3_paused_s=0.3)


async def test_vocoder_batch_sizes_are_exported(settings: Settings) -> None:
    async with in_process(settings, _BatchingEngine()) as gw:
        scraped = samples((await gw.http.get("/metrics")).text)
    assert value(scraped, "chatterbox_engine_batch_size_count") == 3
    assert value(scraped, "chatterbox_engine_batch_size_sum") == 14
    assert value(scraped, "chatterbox_engine_batch_size_bucket", le="4.0") == 2
    assert value(scraped, "chatterbox_engine_batch_size_bucket", le="8.0") == 2
    assert value(scraped, "chatterbox_engine_batch_size_bucket", le="16.0") == 3
    assert value(scraped, "chatterbox_vocoder_batches_total") == 3
    assert value(scraped, "chatterbox_vocoder_windows_dropped_total") == 2
    assert value(scraped, "chatterbox_vocoder_flow_frames_total") == 4321
    assert value(scraped, "chatterbox_vocoder_whole_utterance_windows_total") == 5
    assert value(scraped, "chatterbox_vocoder_cfm_frames_total") == 3000
    assert value(scraped, "chatterbox_vocoder_cfm_solved_frames_total") == 3600
    assert value(scraped, "chatterbox_vocoder_cfm_eager_frames_total") == 120
    assert value(scraped, "chatterbox_vocoder_hift_frames_total") == 900
    assert value(scraped, "chatterbox_vocoder_hift_eager_frames_total") == 90
    assert value(scraped, "chatterbox_watermark_passes_total") == 7
    assert value(scraped, "chatterbox_t3_first_window_pauses_total") == 6
    assert value(scraped, "chatterbox_t3_first_window_paused_seconds_total") == 0.3
    assert value(scraped, "chatterbox_watermark_windows_total") == 40
    assert value(scraped, "chatterbox_watermark_busy_seconds_total") == 1.5


class _T3Engine(FakeEngine):
    """A fake engine reporting its T3 requests per model, as the vLLM engine does."""

    def t3_stats(self) -> dict[str, T3Stats]:
        return {"chatterbox": T3Stats(waiting=3, decoding=5, requests=20, tokens=900, deliveries=450),
                "chatterbox-turbo": T3Stats(waiting=0, decoding=1, requests=2, tokens=40, deliveries=40)}


async def test_t3_requests_are_exported_per_model(settings: Settings) -> None:
    async with in_process(settings, _T3Engine()) as gw:
        scraped = samples((await gw.http.get("/metrics")).text)
    assert value(scraped, "chatterbox_t3_waiting_requests", model="chatterbox") == 3
    assert value(scraped, "chatterbox_t3_decoding_requests", model="chatterbox") == 5
    assert value(scraped, "chatterbox_t3_decoding_requests", model="chatterbox-turbo") == 1
    assert value(scraped, "chatterbox_t3_requests_total", model="chatterbox-turbo") == 2
    assert value(scraped, "chatterbox_t3_tokens_total", model="chatterbox") == 900
    assert value(scraped, "chatterbox_t3_token_deliveries_total", model="chatterbox") == 450


class _NoT3Engine(FakeEngine):
    def t3_stats(self) -> None:
        return None  # the protocol's default: an engine that does not report them


async def test_engines_without_t3_counts_export_none(settings: Settings) -> None:
    async with in_process(settings, _NoT3Engine()) as gw:
        await gw.http.post("/v1/audio/speech", json=SPEECH)
        text = (await gw.http.get("/metrics")).text
    assert "chatterbox_t3_" not in text


async def test_the_fake_engine_counts_its_chunks_as_t3_requests(settings: Settings) -> None:
    engine = FakeEngine()
    async with in_process(settings, engine) as gw:
        response = await gw.http.post("/v1/audio/speech", json={**SPEECH, "response_format": "pcm"})
        scraped = samples((await gw.http.get("/metrics")).text)
    tokens = len(response.content) // 2 // 960
    model = engine.jobs[0].model
    assert tokens > 0 and value(scraped, "chatterbox_t3_tokens_total", model=model) == tokens
    assert value(scraped, "chatterbox_t3_requests_total", model=model) == len(engine.jobs[0].chunks)
    assert value(scraped, "chatterbox_t3_waiting_requests", model=model) == 0
    assert value(scraped, "chatterbox_t3_decoding_requests", model=model) == 0


def test_the_cuda_allocator_is_exported_once_cuda_is_in_use(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    from gateway.observability.metrics import GatewayMetrics

    text = GatewayMetrics().render()[0].decode()
    assert "chatterbox_cuda_" not in text  # CPU: CUDA never initialised, nothing shown
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: (i + 1) * 1_000_000)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: (i + 1) * 4_000_000)
    text = GatewayMetrics().render()[0].decode()
    assert "chatterbox_cuda_allocated_bytes 3e+06" in text and "chatterbox_cuda_reserved_bytes 1.2e+07" in text


def test_the_load_test_splits_gpu_memory_by_process_and_allocator(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gateway.engine.vllm import gpu_memory
    from gateway.tools import host_probes, loadtest

    monkeypatch.setattr(gpu_memory, "gpu_memory_by_pid", lambda: {100: 3 << 30, 101: 90 << 30, 555: 1 << 30})
    monkeypatch.setattr(host_probes, "descendants", lambda pid: [101, 102])
    split = loadtest._gpu_split(100, {"chatterbox_cuda_allocated_bytes": 2 << 30, "chatterbox_cuda_reserved_bytes": 5 << 29})
    assert split == {"server": 3072.0, "children": 92160.0, "server_allocated": 2048.0, "server_reserved": 2560.0}
    assert loadtest._gpu_split(None, {}) == dict.fromkeys(split)  # no pid, no GPU: unknown, not zero


def test_a_t3_request_moves_from_waiting_to_decoding_and_ends_once() -> None:
    stats = T3Stats()
    never, served = stats.request(), stats.request()
    assert (stats.requests, stats.waiting, stats.decoding) == (2, 2, 0)
    served.delivered(3)
    served.delivered(1)
    assert (stats.waiting, stats.decoding, stats.tokens, stats.deliveries) == (1, 1, 4, 2)
    never.end()  # aborted before its first token
    served.end()
    served.end()  # a second end counts nothing
    assert (stats.requests, stats.waiting, stats.decoding, stats.tokens) == (2, 0, 0, 4)
