"""The encoder benchmark runs every available route through the real encoders and prints
one table row per route and format."""

from __future__ import annotations

import shutil

from gateway.tools import encoder_bench


def test_benchmark_prints_a_row_per_route_and_format(capsys) -> None:
    encoder_bench.main(["--runs", "2", "--warmup", "0", "--seconds", "1.6", "--formats", "mp3", "opus"])
    out = capsys.readouterr().out
    routes = [r.name for r in encoder_bench.available_routes()]
    # PyAV and the imageio-ffmpeg wheel (the install brings both), and a system FFmpeg where
    # there is one
    assert len(routes) == 2 + (shutil.which("ffmpeg") is not None)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(routes) * 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] in routes and cells[1] in ("mp3", "opus")
        p50, p95, cpu = map(float, cells[2:])
        assert 0 < p50 <= p95 and cpu > 0
