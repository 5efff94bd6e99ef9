"""The CFM operation-count benchmark (``gateway.tools.bench_cfm_ops``): its counts are the
served solver's, per family."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

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
    assert row["gflop_per_solve"] > 0
    assert "kernels_per_solve" not in row and "graph_ms" not in row, "CUDA-only figures"


def test_the_flop_count_takes_products_convolutions_and_attention_from_their_shapes() -> None:
    """2 per multiply-add: a (5 x 8) @ (8 x 3) product 240, a 1-d convolution of 4 -> 6
    channels, kernel 3, over 10 outputs 1440, and attention over 2 x 4 heads of 7 queries and 9
    keys of width 16 (scores and their use: 2 products) 2 x 2 x 8 x 7 x 9 x 16 = 32256."""
    counter = bench_cfm_ops.OpCounter()
    with counter, torch.inference_mode():
        torch.randn(5, 8) @ torch.randn(8, 3)
    assert counter.flops == 240
    counter = bench_cfm_ops.OpCounter()
    with counter, torch.inference_mode():
        F.conv1d(torch.randn(1, 4, 12), torch.randn(6, 4, 3))
    assert counter.flops == 2 * 6 * 4 * 3 * 10
    counter = bench_cfm_ops.OpCounter()
    with counter, torch.inference_mode():
        F.scaled_dot_product_attention(torch.randn(2, 4, 7, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16))
    assert counter.flops == 2 * 2 * (2 * 4 * 7 * 9 * 16)
