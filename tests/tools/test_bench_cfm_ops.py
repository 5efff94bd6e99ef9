"""The CFM operation-count benchmark (``gateway.tools.bench_cfm_ops``): its counts are the
served solver's, per family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_attention_modes_and_padded_rows_on_the_cpu(tmp_path: Path) -> None:
    """``--attention sdpa,varlen``: a row each; on a CPU varlen cannot run and the row says so
    (the solver ran SDPA). ``--real-frames``: the rows' real lengths, what varlen would skip."""
    out = tmp_path / "ops.json"
    assert bench_cfm_ops.main(["--models", "chatterbox-turbo", "--rows", "3", "--frames", "40", "--repeats", "1",
                               "--device", "cpu", "--attention", "sdpa,varlen", "--real-frames", "0.5",
                               "--json", str(out)]) == 0
    sdpa, varlen = json.loads(out.read_text())["rows"]
    assert sdpa["attention"] == "sdpa" and "attention_note" not in sdpa
    assert varlen["attention"] == "sdpa" and "CUDA" in varlen["attention_note"]
    assert sdpa["real_frames"] == varlen["real_frames"] == 20 + 30 + 40
    assert bench_cfm_ops.real_lengths(1, 40, 0.5) == [40] and bench_cfm_ops.real_lengths(2, 40, 1.0) == [40, 40]
    with pytest.raises(SystemExit):
        bench_cfm_ops.main(["--attention", "flash"])
    with pytest.raises(SystemExit):
        bench_cfm_ops.main(["--real-frames", "0"])


def test_varlen_attention_flops_count_each_rows_used_keys() -> None:
    """FlashAttention's variable-length kernel over 3 rows of width 4 ((12, 2, 8) packed), using
    4, 0 and 3 keys: 2 products x 2 per multiply-add x heads x d x width x used keys."""
    q = torch.zeros(12, 2, 8)
    starts = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    args = (q, q, q, starts, starts, 4, 4, 0.0, False, False)
    assert bench_cfm_ops.varlen_flops(args, {"seqused_k": torch.tensor([4, 0, 3], dtype=torch.int32)}) == \
        4 * 2 * 8 * 4 * (4 + 0 + 3)
    assert bench_cfm_ops.varlen_flops(args, {}) is None, "without seqused_k, torch's own formula"


def test_the_kernel_table_splits_a_solve_by_kind(tmp_path: Path) -> None:
    """``--kernel-table`` on a CPU: the operators' own time by kind, shares of one sum, the
    estimator's products, attention and convolutions each found."""
    out = tmp_path / "kernels.json"
    assert bench_cfm_ops.main(["--models", "chatterbox-turbo", "--rows", "1", "--frames", "40", "--repeats", "1",
                               "--device", "cpu", "--kernel-table", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    table = row["kernel_table"]
    kinds = table["kinds"]
    assert {"matmul", "attention", "convolution", "norm", "elementwise"} <= set(kinds)
    assert abs(sum(k["share"] for k in kinds.values()) - 1.0) < 0.01
    assert abs(sum(k["ms"] for k in kinds.values()) - table["sum_ms"]) < 0.01 * table["sum_ms"] + 0.01
    # 56 transformer blocks, 2 calls (Turbo's 2 steps, no CFG): one SDPA kernel each (the
    # CPU's table also counts SDPA's dispatching wrapper, which has its own time)
    (sdpa,) = [t for t in table["top"] if "flash_attention_for_cpu" in t["name"]]
    assert (sdpa["kind"], sdpa["count"]) == ("attention", 2 * 56)
    assert table["top"][0]["ms"] >= table["top"][-1]["ms"] and table["top"][0]["kind"] == "matmul"


@pytest.mark.parametrize(("name", "kind"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNN", "matmul"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel", "convolution"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    # SDPA with a padding bias on an H100 (2026-12-06): cuDNN's attention, not a convolution
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1>", "reduction"),
    ("triton_poi_fused_convolution_mish_0", "elementwise"),
    ("triton_per_fused_native_layer_norm_1", "norm"),
    ("triton_tem_fused_mm_2", "matmul"),
    ("void some_unknown_kernel", "other"),
])
def test_kernel_names_fall_in_their_kinds(name: str, kind: str) -> None:
    """CUDA kernel names as the profiler gives them on an H100 (cuBLAS, cuDNN, FlashAttention,
    PyTorch's own, inductor's)."""
    assert bench_cfm_ops.kernel_kind(name) == kind
