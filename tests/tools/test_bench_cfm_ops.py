"""The CFM operation-count benchmark (``gateway.tools.bench_cfm_ops``): its counts are the
served solver's, per family."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.tools import bench_cfm_ops


def test_turbo_row_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ops.json"
    assert bench_cfm_ops.main(["--models", "chatterbox-turbo", "--rows", "1", "--frames", "40", "--repeats", "1",
                               "--device", "cpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"card", "date", "command", "rows"} <= set(doc)
    (row,) = doc["rows"]
    assert (row["model"], row["rows"], row["frames"], row["steps"], row["compile"]) == ("chatterbox-turbo", 1, 40, 2, "off")
    # S3Gen's estimator: 56 transformer blocks, 4 GEMMs each per call (q/k/v fused), 2 calls (no CFG)
    assert row["top_ops"]["aten.linear"] == 2 * 56 * 4
    assert row["ops_per_solve"] > row["top_ops"]["aten.linear"] and row["eager_ms"] > 0
    assert "kernels_per_solve" not in row and "graph_ms" not in row, "CUDA-only figures"
