"""The benchmark's live-server stages (timeline, http rows, load test) against a real server on
the fake engine: the JSON document's shape, every figure's definition on known arrivals, the
per-stream audio-length check, and the timeline a request asks for."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.settings import Settings
from gateway.tools import bench_http, bench_timeline, benchmark, loadtest, py_spy, timeline_log

ROW_KEYS = {"model", "concurrency", "ttfb_p50_ms", "ttfb_p95_ms", "steady_audio_s_per_s", "rtf_p50", "errors"}


def test_one_run_through_a_server_writes_the_documented_json(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "http.json"
    code = benchmark.main([
        "--stages", "timeline,http,loadtest", "--server-engine", "fake", "--models", "chatterbox,mixed",
        "--server-models", "chatterbox,chatterbox-turbo,chatterbox-multilingual", "--http-concurrency", "1,3",
        "--http-window-s", "2", "--timeline-runs", "2", "--loadtest-s", "2", "--loadtest-concurrency", "3",
        "--server-cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    doc = json.loads(out.read_text())
    assert code == 0, doc["stages"].get("errors")
    assert {"card", "date", "command", "rows", "stages"} <= set(doc) and doc["command"].startswith("python -m")
    assert [(r["model"], r["concurrency"]) for r in doc["rows"]] == [
        ("chatterbox", 1), ("chatterbox", 3), ("mixed", 1), ("mixed", 3)]
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row) and row["errors"] == 0, row
        assert row["steady_audio_s_per_s"] > 0 and row["rtf_p50"] > 0 and row["ttfb_p50_ms"] > 0
        assert row["server_tree_rss_mib"] > 0 and row["requests_completed"] > 0
    assert doc["rows"][3]["models"] == {"chatterbox": 1, "chatterbox-turbo": 1, "chatterbox-multilingual": 1}
    stages = [s["stage"] for s in doc["stages"]["timeline"]["stages"]]
    assert stages[0] == "body read" and stages[-1] == "first byte written"
    assert {"voice conditionals ready", "engine first audio", "encoder first bytes"} <= set(stages)
    loadtest_report = doc["stages"]["loadtest"]
    assert loadtest_report["exit"] == 0 and loadtest_report["error_count"] == 0
    assert loadtest_report["audio_s_per_request"]["min"] > 0
    assert (out.parent / "server.log").exists()


@pytest.mark.skipif(py_spy.executable() is None, reason="py-spy is a dev dependency")
def test_an_http_row_can_carry_py_spy_samples_of_the_server_and_the_client(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    code = benchmark.main([
        "--stages", "http", "--server-engine", "fake", "--models", "chatterbox", "--http-concurrency", "2",
        "--http-window-s", "6", "--http-py-spy-s", "10", "--server-cache-dir", str(tmp_path / "cache"),
        "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert code == 0 and row["errors"] == 0
    server, client = row["py_spy"]["server"], row["py_spy"]["client"]
    assert server["seconds"] == client["seconds"] == 2.0  # clamped: two thirds of 6 s less 2 s
    serving = {r["thread"]: r for r in server["threads"]}
    assert serving["MainThread"]["active_share"] > 0  # the event loop served the streams
    assert any(f.endswith("(gateway/engine/fake.py)") for f, _ in serving["MainThread"]["top_gateway"])
    assert 0 < server["gil_share"] <= 1 and client["threads"]
    # the raw stacks come back as one archive beside the JSON (the GPU machine returns 8 files)
    import tarfile

    archive = tmp_path / "http-pyspy.tar.xz"
    with tarfile.open(archive) as tar:
        members = set(tar.getnames())
    refs = server["files"] + client["files"]
    assert refs and all(f.startswith("http-pyspy.tar.xz:") and f.split(":", 1)[1] in members for f in refs)
    assert not (tmp_path / "http-pyspy").exists() and not list(tmp_path.glob("pyspy_*"))


def test_the_figures_follow_their_definitions() -> None:
    """A 9 s window, steady from 3 s: audio arriving before 3 s does not count, nor do
    requests started before it count for first audio; the first wave is apart."""
    level = bench_http._Level(t0=100.0)
    level.requests = [
        bench_http._Request("chatterbox", 100.0, first=0.5, ended=102.0, samples=48_000),  # first wave
        bench_http._Request("chatterbox", 104.0, first=0.2, ended=106.0, samples=48_000),
        bench_http._Request("chatterbox", 106.0, first=0.4, ended=None),  # cancelled at the end
        bench_http._Request("chatterbox", 107.0, error="http_429"),
    ]
    level.arrivals = [(101.0, 96_000), (104.5, 48_000), (106.5, 48_000), (109.5, 24_000), (110.0, 999)]
    row = bench_http._row(level, ["chatterbox"] * 2, 9.0, "pcm", "alloy", {}, {}, None, None, {"rss": 0, "gpu": 0})
    assert row["steady_audio_s_per_s"] == round((48_000 + 48_000) / 48_000 / 6.0, 2)  # 103 s to 109 s
    assert row["ttfb_samples"] == 2 and row["ttfb_p50_ms"] == pytest.approx(300.0)
    assert row["first_wave_ttfb_p50_ms"] == 500.0
    assert row["rtf_p50"] == 1.0 and row["errors"] == 1 and row["error_kinds"] == {"http_429": 1}
    assert row["requests_cancelled_at_end"] == 1 and row["requests_completed"] == 2
    assert not any(k.startswith("t3_") for k in row)  # the server reported no T3 counts


def test_the_stall_figures_of_a_row() -> None:
    figures = bench_http.stall_figures([0.41, 0.0, 0.01, 0.0])
    assert figures["stalled_share"] == 0.25  # one utterance of four waited more than 50 ms
    assert figures["stall_p95_ms"] == pytest.approx(pct_ms([0.41, 0.0, 0.01, 0.0], 0.95))
    assert bench_http.stall_figures([]) == {"stalled_share": None, "stall_p95_ms": None}


def pct_ms(values: list[float], q: float) -> float:
    return round(bench_http.pct(values, q) * 1000, 1)


def test_the_stall_columns_are_of_completed_pcm_requests() -> None:
    level = bench_http._Level(t0=100.0)
    smooth = bench_http._Request("chatterbox", 100.0, first=0.3, ended=103.0, samples=48_000)
    smooth.player.arrive(100.3, 2.0)
    late = bench_http._Request("chatterbox", 100.0, first=0.3, ended=104.0, samples=48_000)
    late.player.arrive(100.3, 1.0)
    late.player.arrive(101.8, 1.0)  # half a second of silence
    level.requests = [smooth, late, bench_http._Request("chatterbox", 101.0, error="http_429")]
    row = bench_http._row(level, ["chatterbox"] * 2, 9.0, "pcm", "alloy", {}, {}, None, None, {"rss": 0, "gpu": 0})
    assert row["stalled_share"] == 0.5 and row["stall_p95_ms"] == pct_ms([0.0, 0.5], 0.95)
    mp3 = bench_http._row(level, ["chatterbox"] * 2, 9.0, "mp3", "alloy", {}, {}, None, None, {"rss": 0, "gpu": 0})
    assert mp3["stalled_share"] is None  # compressed bytes do not say the seconds


def test_the_loop_lag_column_is_the_mean_over_the_steady_span() -> None:
    level = bench_http._Level(t0=100.0)
    lag = "chatterbox_event_loop_lag_seconds"
    marks = {"steady": {f"{lag}_count": 10.0, f"{lag}_sum": 0.5}, "end": {f"{lag}_count": 34.0, f"{lag}_sum": 0.74}}
    row = bench_http._row(level, ["chatterbox"], 9.0, "pcm", "alloy", {}, marks, None, None, {"rss": 0, "gpu": 0})
    assert row["loop_lag_mean_ms"] == 10.0  # 0.24 s late over 24 wake-ups
    quiet = bench_http._row(level, ["chatterbox"], 9.0, "pcm", "alloy", {}, {}, None, None, {"rss": 0, "gpu": 0})
    assert "loop_lag_mean_ms" not in quiet  # a server without the probe


def test_the_t3_columns_follow_their_definitions() -> None:
    """Gauges sampled every second (the steady span from 103 s), counters at the two marks."""
    level = bench_http._Level(t0=100.0)
    level.t3 = [(101.0, 40.0, 10.0), (104.0, 2.0, 48.0), (106.0, 0.0, 52.0), (108.0, 1.0, 50.0)]
    marks = {"steady": {"chatterbox_t3_tokens_total": 1000.0, "chatterbox_t3_token_deliveries_total": 500.0},
             "end": {"chatterbox_t3_tokens_total": 7000.0, "chatterbox_t3_token_deliveries_total": 2000.0}}
    row = bench_http._row(level, ["chatterbox"] * 50, 9.0, "pcm", "alloy", {}, marks, None, None,
                          {"rss": 0, "gpu": 0})
    assert row["t3_waiting_max"] == 40.0  # the first wave queued
    assert row["t3_waiting_mean"] == 1.0 and row["t3_decoding_mean"] == 50.0
    assert row["t3_tokens_per_s"] == 1000.0 and row["t3_tokens_per_stream_s"] == 20.0  # 6000 over 6 s, 50 streams
    assert row["t3_tokens_per_delivery"] == 4.0


def test_the_vocoder_columns_follow_the_counters_over_the_window() -> None:
    level = bench_http._Level(t0=100.0)
    before = {"chatterbox_vocoder_batches_total": 10.0, "chatterbox_vocoder_windows_total": 40.0,
              "chatterbox_vocoder_audio_seconds_total": 50.0, "chatterbox_vocoder_flow_frames_total": 9000.0,
              "chatterbox_vocoder_whole_utterance_windows_total": 3.0,
              "chatterbox_vocoder_cfm_frames_total": 1000.0, "chatterbox_vocoder_cfm_solved_frames_total": 1200.0,
              "chatterbox_vocoder_cfm_eager_frames_total": 100.0,
              "chatterbox_vocoder_hift_frames_total": 500.0, "chatterbox_vocoder_hift_eager_frames_total": 50.0,
              "chatterbox_watermark_passes_total": 5.0, "chatterbox_watermark_windows_total": 20.0,
              "chatterbox_watermark_busy_seconds_total": 1.0,
              "chatterbox_t3_first_window_pauses_total": 2.0, "chatterbox_t3_first_window_paused_seconds_total": 0.1}
    end = {"chatterbox_vocoder_batches_total": 14.0, "chatterbox_vocoder_windows_total": 100.0,
           "chatterbox_vocoder_audio_seconds_total": 150.0, "chatterbox_vocoder_flow_frames_total": 24000.0,
           "chatterbox_vocoder_whole_utterance_windows_total": 11.0,
           "chatterbox_vocoder_cfm_frames_total": 4000.0, "chatterbox_vocoder_cfm_solved_frames_total": 5200.0,
           "chatterbox_vocoder_cfm_eager_frames_total": 700.0,
           "chatterbox_vocoder_hift_frames_total": 2500.0, "chatterbox_vocoder_hift_eager_frames_total": 550.0,
           "chatterbox_watermark_passes_total": 9.0, "chatterbox_watermark_windows_total": 80.0,
           "chatterbox_watermark_busy_seconds_total": 5.5,
           "chatterbox_t3_first_window_pauses_total": 6.0, "chatterbox_t3_first_window_paused_seconds_total": 0.3}
    row = bench_http._row(level, ["chatterbox"] * 8, 9.0, "pcm", "alloy", before, {"end": end}, None, None,
                          {"rss": 0, "gpu": 0})
    assert row["vocoder_rows_per_batch"] == 15.0  # 60 windows in 4 batches
    assert row["vocoder_flow_frames_per_audio_s"] == 150.0  # 15000 frames for 100 audio-seconds
    assert row["vocoder_windows_per_audio_s"] == 0.6  # 60 windows for 100 audio-seconds
    assert row["vocoder_hift_eager_share"] == 0.25  # 500 of the 2000 HiFT frames outside a graph
    assert row["vocoder_whole_utterance_windows"] == 8
    assert row["vocoder_cfm_padding_share"] == 0.25  # 3000 real frames of 4000 solved
    assert row["vocoder_cfm_eager_share"] == 0.2  # 600 of the 3000 real frames outside a graph
    assert row["watermark_rows_per_pass"] == 15.0  # 60 windows in 4 passes
    assert row["watermark_busy_share"] == 0.5  # 4.5 s busy of the 9 s window
    assert (row["t3_pauses"], row["t3_pause_mean_ms"]) == (4, 50.0)  # 0.2 s of T3 held in 4 pauses
    bare = bench_http._row(level, ["chatterbox"] * 8, 9.0, "pcm", "alloy", {}, {}, None, None, {"rss": 0, "gpu": 0})
    assert "vocoder_flow_frames_per_audio_s" not in bare and "vocoder_whole_utterance_windows" not in bare
    assert "vocoder_cfm_padding_share" not in bare and "vocoder_cfm_eager_share" not in bare
    assert "vocoder_hift_eager_share" not in bare and "vocoder_windows_per_audio_s" not in bare
    assert "watermark_rows_per_pass" not in bare and "watermark_busy_share" not in bare
    assert "t3_pauses" not in bare


def test_the_engine_thread_and_cpu_columns_follow_the_counters_over_the_window() -> None:
    """T3's steps in the engine thread (wall and CPU per step) and the cores each thread group
    kept busy, over the 10 s window; none where the server reports none."""
    level = bench_http._Level(t0=100.0)
    threads = 'chatterbox_thread_cpu_seconds{threads="%s"}'
    before = {"chatterbox_t3_engine_steps_total": 100.0, "chatterbox_t3_engine_step_seconds_total": 2.0,
              "chatterbox_t3_engine_step_cpu_seconds_total": 0.5, "process_cpu_seconds_total": 30.0,
              threads % "MainThread": 10.0, threads % "vllm-engine": 4.0, threads % "other": 16.0}
    end = {"chatterbox_t3_engine_steps_total": 600.0, "chatterbox_t3_engine_step_seconds_total": 12.0,
           "chatterbox_t3_engine_step_cpu_seconds_total": 3.0, "process_cpu_seconds_total": 55.0,
           threads % "MainThread": 17.0, threads % "vllm-engine": 7.5, threads % "other": 30.5,
           threads % "vocoder": 3.0}
    row = bench_http._row(level, ["chatterbox"] * 8, 10.0, "pcm", "alloy", before, {"end": end}, None, None,
                          {"rss": 0, "gpu": 0})
    assert row["t3_steps_per_s"] == 50.0  # 500 steps in 10 s
    assert (row["t3_step_ms"], row["t3_step_cpu_ms"]) == (20.0, 5.0)  # 10 s wall, 2.5 s CPU in 500 steps
    assert row["cpu_process"] == 2.5
    assert (row["cpu_MainThread"], row["cpu_vllm_engine"], row["cpu_other"]) == (0.7, 0.35, 1.45)
    assert "cpu_vocoder" not in row  # started within the window: no start to count from
    bare = bench_http._row(level, ["chatterbox"] * 8, 10.0, "pcm", "alloy", {}, {}, None, None, {"rss": 0, "gpu": 0})
    assert not {"t3_step_ms", "cpu_process", "cpu_MainThread"} & set(bare)


def test_labelled_metrics_are_summed_over_their_labels() -> None:
    from gateway.tools.bench_server import parse_metrics

    text = "\n".join([
        "# HELP chatterbox_t3_tokens_total Speech tokens T3 delivered, by model.",
        'chatterbox_t3_tokens_total{model="chatterbox"} 900.0',
        'chatterbox_t3_tokens_total{model="chatterbox-turbo"} 100.0',
        'chatterbox_engine_batch_size_bucket{le="4.0"} 2.0',
        "chatterbox_in_flight_requests 3.0",
        'odd_label{text="a } b"} 5.0',
    ])
    parsed = parse_metrics(text)
    assert parsed["chatterbox_t3_tokens_total"] == 1000.0 and parsed["chatterbox_in_flight_requests"] == 3.0
    assert "chatterbox_engine_batch_size_bucket" not in parsed and parsed["odd_label"] == 5.0
    assert parsed['chatterbox_t3_tokens_total{model="chatterbox-turbo"}'] == 100.0  # and each by itself


def test_an_http_row_can_carry_timelines_under_load(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    code = benchmark.main([
        "--stages", "http", "--server-engine", "fake", "--models", "chatterbox", "--http-concurrency", "3",
        "--http-window-s", "3", "--http-timelines", "--server-cache-dir", str(tmp_path / "cache"),
        "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert code == 0 and row["errors"] == 0
    wave, steady = row["timeline_first_wave"], row["timeline_steady"]
    assert wave[0]["runs"] >= 3 and [s["stage"] for s in wave][-1] == "first byte written"
    assert steady and steady[-1]["stage"] == "first byte written" and steady[-1]["runs"] >= 3
    # the slowest tenth of the steady requests (the p95's): fewer of them, each no sooner
    tail = row["timeline_tail"]
    assert tail[-1]["stage"] == "first byte written" and 1 <= tail[-1]["runs"] < steady[-1]["runs"]
    # The gauges are sampled once a second and the fake decodes a request in a few ms, so a sample
    # may well find none decoding: their columns must be there; the token counter must have moved.
    # (The arithmetic of the columns is test_the_t3_columns_follow_their_definitions's.)
    assert row["t3_waiting_max"] >= 0 and row["t3_decoding_mean"] >= 0 and row["t3_tokens_per_s"] > 0


def test_the_timeline_tail_is_the_steady_requests_slowest_to_first_audio(tmp_path: Path) -> None:
    """``timeline_tail``: of the requests sent in the steady span whose first audio came inside
    the window (those ``ttfb_p95_ms`` is taken over), the ones at or above its 90th percentile;
    their stage medians say where the p95 waited (here: in the vocoder's queue)."""
    level = bench_http._Level(t0=100.0)
    lines = []
    for i in range(20):  # sent at 104 + 0.1 i (the steady span of a 12 s window starts at 104)
        first = 0.5 + 0.01 * i if i < 18 else 2.0  # two slow ones
        req = bench_http._Request("chatterbox", 104.0 + 0.1 * i, request_id=f"r{i}", first=first)
        level.requests.append(req)
        queued = 100.0 if i < 18 else 1500.0
        lines.append({"request_id": f"r{i}", "timeline": [["t3 first window", 80.0], ["vocoder queued", 80.0 + queued],
                                                          ["first byte written", first * 1000]]})
    level.requests.append(bench_http._Request("chatterbox", 101.0, request_id="early", first=5.0))  # not steady
    level.requests.append(bench_http._Request("chatterbox", 111.5, request_id="late", first=3.0))  # after the window
    log = tmp_path / "server.log"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    found = bench_http._timelines(level, 12.0, log, wait_s=0.0)
    tail, steady = found["timeline_tail"], found["timeline_steady"]
    assert [r["runs"] for r in tail] == [2, 2, 2]
    assert {r["stage"]: r["delta_ms"] for r in tail}["vocoder queued"] == 1500.0
    assert {r["stage"]: r["delta_ms"] for r in steady}["vocoder queued"] == 100.0
    assert steady[-1]["runs"] == 20  # "late" has no timeline in the log: read as missing, not an error


def test_a_body_of_the_wrong_length_is_an_error() -> None:
    assert loadtest._check_body("pcm", b"", 2 * 960 * 5) is None
    assert loadtest._check_body("pcm", b"", 2 * 960 * 5 + 2) == "audio_length"
    assert loadtest._check_body("pcm", b"", 2 * 960 * 5, expect_samples=960 * 6) == "audio_length"
    assert loadtest._check_body("wav", b"RIFF\0\0\0\0WAVE", 44 + 2 * 960, expect_samples=960) is None
    assert loadtest._check_body("mp3", b"ID3", 1001) is None  # not countable: not checked


def test_streams_for_mixed_take_the_families_in_turn() -> None:
    families = ["chatterbox", "chatterbox-turbo", "chatterbox-multilingual"]
    assert bench_http.streams_for("mixed", 4, families) == families + ["chatterbox"]
    assert bench_http.streams_for("chatterbox", 2, families) == ["chatterbox"] * 2
    assert bench_http.request_body("chatterbox-multilingual", "alloy", "pcm", "hi")["language"] == "en"
    assert "language" not in bench_http.request_body("chatterbox", "alloy", "pcm", "hi")


def test_timelines_summarise_by_stage() -> None:
    runs = [[["body read", 1.0], ["engine first audio", 101.0], ["first byte written", 103.0]],
            [["body read", 3.0], ["engine first audio", 91.0], ["first byte written", 95.0]]]
    table = bench_timeline.summarise(runs)
    assert [r["stage"] for r in table] == ["body read", "engine first audio", "first byte written"]
    assert table[1] == {"stage": "engine first audio", "ms": 96.0, "delta_ms": 94.0, "runs": 2}


def test_a_table_keeps_only_the_first_and_last_of_t3s_token_stages() -> None:
    stages = ["body read"] + [f"t3 tokens: {k}" for k in range(1, 12)] + ["first byte written"]
    table = bench_timeline.summarise([[[s, float(i)] for i, s in enumerate(stages)]])
    assert [r["stage"] for r in timeline_log.compact(table)] == [
        "body read", "t3 tokens: 1", "t3 tokens: 11", "first byte written"]
    assert timeline_log.compact(table[:3]) == table[:3]
    assert "| t3 tokens: 11" in timeline_log.table_text("title", table)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, request_timeline=True)


async def test_a_request_asks_for_its_timeline_and_others_pay_nothing(gateway) -> None:
    body = {"model": "tts-1-hd", "input": "Hello there.", "voice": "alloy", "response_format": "pcm"}
    with capture_logs() as logs:
        plain = await gateway.http.post("/v1/audio/speech", json=body)
        traced = await gateway.http.post("/v1/audio/speech", json=body, headers={"X-Timeline": "1"})
    assert plain.status_code == traced.status_code == 200
    lines = [entry for entry in logs if entry.get("event") == "request" and entry.get("path") == "/v1/audio/speech"]
    assert "timeline" not in lines[0]
    stages = [stage for stage, _ in lines[1]["timeline"]]
    assert stages[:2] == ["body read", "body decoded"] and stages[-1] == "first byte written"
    times = [ms for _, ms in lines[1]["timeline"]]
    assert times == sorted(times) and times[0] >= 0


async def test_the_header_is_ignored_unless_the_server_allows_timelines(make_gateway, fake_engine, settings) -> None:
    from harness import in_process

    body = {"model": "tts-1-hd", "input": "Hello there.", "voice": "alloy", "response_format": "pcm"}
    async with in_process(msgspec.structs.replace(settings, request_timeline=False), fake_engine) as gw:
        with capture_logs() as logs:
            assert (await gw.http.post("/v1/audio/speech", json=body, headers={"X-Timeline": "1"})).status_code == 200
    assert all("timeline" not in entry for entry in logs)


def test_timelines_are_read_from_a_growing_log(tmp_path: Path) -> None:
    """Lines come in as requests end, the last one maybe half-written when first read; other
    lines and requests are ignored, and a request that never shows is left out after the wait."""
    import threading

    log = tmp_path / "server.log"
    log.write_bytes(b'{"request_id": "a", "timeline": [["body read", 1.0]]}\nnot json\n{"request_id": "b", "time')
    writer = threading.Timer(0.3, lambda: log.open("ab").write(
        b'line": [["body read", 2.0]]}\n{"request_id": "x", "timeline": []}\n'))
    writer.start()
    found = timeline_log.read_timelines(log, ["a", "b", "missing"], wait_s=1.0)
    writer.join()
    assert found == {"a": [["body read", 1.0]], "b": [["body read", 2.0]]}


def test_a_server_that_dies_ends_the_row_and_the_run(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On the H200 a crashed server's row ran out its window collecting 27372 connection errors;
    now the row ends when the server exits, later rows and stages are skipped, and the run's
    errors carry the end of the server's log."""
    import asyncio
    import os
    import signal
    import time

    real = bench_http.measure_level

    async def killing(base, models, **kw):  # type: ignore[no-untyped-def]
        async def kill() -> None:
            await asyncio.sleep(1.0)
            os.kill(kw["server_pid"], signal.SIGKILL)

        killer = asyncio.create_task(kill())
        try:
            return await real(base, models, **kw)
        finally:
            killer.cancel()

    monkeypatch.setattr(bench_http, "measure_level", killing)
    out = tmp_path / "bench" / "http.json"
    t0 = time.perf_counter()
    benchmark.main(["--stages", "http,loadtest", "--server-engine", "fake", "--models", "chatterbox",
                    "--http-concurrency", "2,4", "--http-window-s", "30", "--loadtest-s", "30",
                    "--server-cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    took = time.perf_counter() - t0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]  # the 4-stream row never ran
    assert row["concurrency"] == 2 and 0.5 <= row["server_died_at_s"] <= 15  # killed at 1 s of a 30 s window
    assert "loadtest" not in doc["stages"]
    (error,) = doc["stages"]["errors"]
    assert error["stage"] == "http" and "the server died" in error["error"] and "Its log ends" in error["error"]
    assert took < 60  # not two 30 s windows and a 30 s load test


def test_liveness_tells_a_zombie_from_a_live_process() -> None:
    import subprocess
    import sys

    from gateway.tools import host_probes

    assert host_probes.alive(os.getpid()) is True
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert host_probes.alive(child.pid) is True
        child.kill()
        deadline = time.monotonic() + 10
        while host_probes.alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_probes.alive(child.pid) is False  # dead, not yet reaped: a zombie
    finally:
        child.wait()
    assert host_probes.alive(child.pid) is False  # reaped: gone
