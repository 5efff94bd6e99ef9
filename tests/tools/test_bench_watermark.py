"""The watermark benchmark stage on the CPU, through the benchmark's command line: a row per
batch size with both timings, and the batched pass giving the per-row call's audio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.tools import benchmark


def test_the_watermark_stage_times_both_paths_and_checks_they_agree(tmp_path: Path) -> None:
    pytest.importorskip("perth")
    out = tmp_path / "bench.json"
    code = benchmark.main(["--stages", "watermark", "--watermark-batches", "1,3", "--watermark-window-s", "0.5",
                           "--profile-repeats", "1", "--json", str(out)])
    assert code == 0
    assert "Infinity" not in out.read_text() and "NaN" not in out.read_text()  # strict JSON for any reader
    rows = json.loads(out.read_text())["stages"]["rows"]
    assert [(r["stage"], r["rows"], r["device"]) for r in rows] == [("watermark", 1, "cpu"), ("watermark", 3, "cpu")]
    for row in rows:
        assert row["per row ms"] > 0 and row["batched ms"] > 0
        assert row["batched audio-s/s"] == pytest.approx(row["rows"] * 0.5 / row["batched ms"] * 1000, rel=0.05)
        snr = row["batched vs per row SNR dB (worst row)"]
        assert snr == "exact" or snr > 100


def test_identical_paths_are_written_as_exact_not_infinity(tmp_path: Path, monkeypatch) -> None:
    # the H200 run of 2026-12-04 gave bit-identical audio for one window: SNR inf, and the
    # JSON carried Infinity, which strict readers reject
    pytest.importorskip("perth")
    from gateway.tools import bench_watermark

    monkeypatch.setattr(bench_watermark, "_snr", lambda a, ref: float("inf"))
    out = tmp_path / "bench.json"
    assert benchmark.main(["--stages", "watermark", "--watermark-batches", "1", "--watermark-window-s", "0.5",
                           "--profile-repeats", "1", "--json", str(out)]) == 0
    text = out.read_text()
    assert "Infinity" not in text
    assert json.loads(text)["stages"]["rows"][0]["batched vs per row SNR dB (worst row)"] == "exact"
