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
    rows = json.loads(out.read_text())["stages"]["rows"]
    assert [(r["stage"], r["rows"], r["device"]) for r in rows] == [("watermark", 1, "cpu"), ("watermark", 3, "cpu")]
    for row in rows:
        assert row["per row ms"] > 0 and row["batched ms"] > 0
        assert row["batched audio-s/s"] == pytest.approx(row["rows"] * 0.5 / row["batched ms"] * 1000, rel=0.05)
        assert row["batched vs per row SNR dB (worst row)"] > 100
