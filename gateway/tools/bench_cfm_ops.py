"""What one CFM solve asks of the device: operations, kernels and milliseconds per solve.

At one stream the first window's CFM is bound by how many kernels it launches, not by its
arithmetic (on an H100, 2026-12-05: 102 ms of the 218 ms first audio for one ~546-frame row;
~1,000 operations per estimator call, 10 calls, CFG-doubled rows). This counts, for the
served solver (:mod:`gateway.engine.vllm.cfm_solver`, the original's CFG Euler solve, and
Turbo's mean-flow solve) on random S3Gen weights:

* **ops per solve**: every operation the solve dispatches that computes something (views and
  eval-mode dropout left out), counted with a ``TorchDispatchMode``: the same on any device,
  a proxy for kernels that a CPU can measure;
* on CUDA, **kernels per solve** (the profiler's device kernels of one eager solve) and the
  **ms per solve**, eager and replayed as the CUDA graph the vocoder captures (median of
  ``--repeats``);
* the CPU milliseconds of an eager solve (on a GPU host too: the host's share);
* **GFLOP per solve** (matrix products, convolutions and attention, counted from their
  shapes in the same dispatch mode: device-independent) and, on CUDA, what the graph replay
  achieves of it in **TFLOP/s**: against the card's peak, the headroom a faster CFM kernel
  set could take (an H100's dense bf16 peak is ~990 TFLOP/s);
* with ``--kernel-table``, **where the solve's time goes**: one eager solve under the
  profiler, its device kernels (on a CPU: its operators' own time) grouped as matrix
  products, attention, convolutions, normalisation, element-wise and the rest, each with its
  milliseconds, share and count, and the kinds' sum against the solve's graph replay (a sum
  well below the replay's time: the solve waits on launches, not arithmetic). Which group to
  make faster (issue 18's item 2: fusion, the attention path) is read from it.

Rows: ``--rows`` batch sizes x window widths in mel frames (``--frames``: 546 is a first
window with a 10 s voice prompt, 646 a regular one, 600 one-shot 10 s with a 5 s prompt) x
families x ``--attention`` modes (``sdpa``: upstream's padding bias through SDPA; ``varlen``:
FlashAttention's variable-length kernel, CUDA only: ``vocoder_attention``). ``--real-frames``
below 1 gives the rows real lengths from that share of the width up to all of it (served
batches pad 11-19% of their solved frames): the padded keys ``varlen`` skips and ``sdpa``
computes. ``python -m gateway.tools.bench_cfm_ops --rows 1,8,32`` (CPU: ``--rows 1 --frames 546
--repeats 1``, ~1 min).
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from gateway.engine.vllm.cfm_solver import ATTENTION_MODES, MEL_BINS, CfmSolver, GraphBuckets
from gateway.engine.vllm.meanflow_solver import flow_solver
from gateway.settings import VOCODER_COMPILE_CHOICES
from gateway.tools.bench_host import print_rows, write_result

FAMILIES = {"chatterbox": (False, 10), "chatterbox-turbo": (True, 2)}
"""model -> (mean-flow S3Gen, flow steps as served)."""

NO_KERNEL = frozenset({"aten.dropout", "aten.lift_fresh", "aten.detach", "aten.alias", "aten.empty",
                       "aten.empty_like", "aten.empty_strided", "aten._reshape_alias", "aten._unsafe_view"})


CONVOLUTIONS = frozenset({"aten.conv1d", "aten.conv2d", "aten.convolution", "aten._convolution"})
ATTENTION = frozenset({"aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu"})
VARLEN_ATTENTION = "aten._flash_attention_forward"
"""``vocoder_attention varlen``'s kernel; with ``seqused_k`` each row's queries meet only its
real keys, which torch's own formula (the whole width) does not see."""


def op_flops(name: str, args: Sequence[Any], out: Any) -> int:
    """Floating-point operations of one dispatched operation (a multiply-add is 2): matrix
    products, convolutions and attention, from their shapes (0 for the rest). The dispatch
    mode sees composite operations (``aten.linear``, ``aten.conv1d``) before they decompose,
    so they are counted here; the rest by torch's own formulas (``torch.utils.flop_counter``)."""
    if name == "aten.linear":
        x, weight = args[0], args[1]
        return 2 * (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1]
    if name == "aten.matmul":
        return 2 * out.numel() * args[0].shape[-1]
    if name in CONVOLUTIONS:  # each output element: (input channels / groups) x kernel multiply-adds
        return 2 * out.numel() * args[1][0].numel()
    if name in ATTENTION:
        query, key, value = args[:3]
        return int(sdpa_flop_count(query.shape, key.shape, value.shape))
    return 0


def varlen_flops(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """:data:`VARLEN_ATTENTION` with ``seqused_k``: (tokens, heads, d) packed rows of the
    width ``args[5]``, each row's queries over its used keys (scores and the weighted sum: 2
    products). None without ``seqused_k`` (torch's formula is right then)."""
    used = kwargs.get("seqused_k")
    if used is None:
        return None
    query, width = args[0], int(args[5])
    return 4 * query.shape[1] * query.shape[2] * width * int(used.sum())


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched inside it that compute something (not views), and
    their floating-point operations (:func:`op_flops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        name = str(packet)
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        varlen = varlen_flops(args, kwargs or {}) if name == VARLEN_ATTENTION else None
        if varlen is not None:
            self.flops += varlen
        elif packet in flop_registry:
            self.flops += flop_registry[packet](*args, **(kwargs or {}), out_val=out)
        else:
            self.flops += op_flops(name, args, out)
        return out


def count_solve(solver: CfmSolver, inputs: Sequence[torch.Tensor]) -> OpCounter:
    """One eager solve's operations and FLOPs (the same function's, compiled or not).

    A compiled solver's own blocks never run under the counting dispatch mode: dynamo does not
    trace under one, and once a compiled function has run under it, that function runs its
    plain Python from then on (torch 2.11, seen on the H100 on 2026-12-05: "compiled" rows with
    the plain solve's 12574 kernels). Its plain twin, on the same decoder, is counted instead."""
    counted = solver if solver.compile == "off" else flow_solver(
        solver.decoder, steps=solver.steps, device=solver.device, dtype=solver.dtype, attention=solver.attention)
    counter = OpCounter()
    with counter:
        counted.solve_eager(*inputs)
    return counter


def count_ops(solver: CfmSolver, inputs: Sequence[torch.Tensor]) -> collections.Counter[str]:
    return count_solve(solver, inputs).ops


def real_lengths(rows: int, frames: int, real_share: float = 1.0) -> list[int]:
    """Each row's real frames: spread evenly from ``real_share`` of ``frames`` up to all of them."""
    low = max(1, round(frames * real_share))
    return [frames if rows == 1 else round(low + (frames - low) * i / (rows - 1)) for i in range(rows)]


def solve_inputs(rows: int, frames: int, device: str, seed: int = 1, real_share: float = 1.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    noise, mu, cond = (torch.randn(rows, MEL_BINS, frames, generator=g) for _ in range(3))
    spks = torch.randn(rows, MEL_BINS, generator=g)
    mask = torch.zeros(rows, 1, frames)
    for row, length in enumerate(real_lengths(rows, frames, real_share)):
        mask[row, :, :length] = 1
    return tuple(t.to(device) for t in (noise, mu, mask, spks, cond))


def _timed(fn: Any, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


KERNEL_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in (
    # first match wins: cuDNN's attention for SDPA with a bias is a "flash_fprop" kernel
    # ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma"), its convolutions are
    # implicit GEMMs ("xmma_fprop_implicit_gemm")
    ("attention", r"sdpa|fmha|flash|attention|attn|softmax"),
    ("convolution", r"conv|fprop|dgrad|wgrad|winograd|implicit|nchwToNhwc|nhwcToNchw"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::mm$|aten::addmm|aten::bmm|aten::linear"),
    ("norm", r"norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|catarray|copy|aten::(add|mul|sub|div|cat|mish|gelu|silu|tanh"
                    r"|sigmoid|softplus|exp|clone|contiguous|copy_|fill_|where|masked_fill|pow|neg|rsub)"),
    ("reduction", r"reduce|aten::(sum|mean|max|min|amax)"),
))
"""Kernel (or, on a CPU, operator) names to the kinds of ``--kernel-table``; the rest: other."""


TRITON_KINDS = {"triton_poi": "elementwise", "triton_red": "reduction", "triton_per": "reduction",
                "triton_tem": "matmul"}
"""Inductor's kernels by their name's prefix (their names also list the fused operators,
e.g. ``triton_poi_fused_convolution_mish``: the bias and activation after a cuDNN call)."""


def kernel_kind(name: str) -> str:
    kind = TRITON_KINDS.get(name[:10])
    if kind is not None:
        return "norm" if kind == "reduction" and "norm" in name else kind
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profiled(fn: Any, cuda: bool) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """One call of ``fn`` under the profiler: microseconds and calls by name, of its device
    kernels on CUDA, of its operators' own time on a CPU (no device kernels there)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    spans: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                spans[e.name] += e.device_time_total
                counts[e.name] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                spans[e.key] += e.self_cpu_time_total
                counts[e.key] += e.count
    return spans, counts


def kernel_table(spans: collections.Counter[str], counts: collections.Counter[str], top: int = 12) -> dict[str, Any]:
    """:func:`profiled`'s time by kind (and the ``top`` names): milliseconds per kind, shares
    of the sum, counts."""
    total_us = sum(spans.values()) or 1.0
    kinds: dict[str, dict[str, float]] = {}
    for name, us in spans.items():
        entry = kinds.setdefault(kernel_kind(name), {"ms": 0.0, "share": 0.0, "count": 0})
        entry["ms"] += us / 1e3
        entry["count"] += counts[name]
    for entry in kinds.values():
        entry["share"] = round(entry["ms"] * 1e3 / total_us, 3)
        entry["ms"] = round(entry["ms"], 3)
    ordered = dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"]))
    return {"sum_ms": round(total_us / 1e3, 3), "kinds": ordered,
            "top": [{"name": name[:120], "kind": kernel_kind(name), "ms": round(us / 1e3, 3), "count": counts[name]}
                    for name, us in spans.most_common(top)]}


def print_kernel_table(row: dict[str, Any]) -> None:
    table = row["kernel_table"]
    replay = f", graph replay {row['graph_ms']} ms" if "graph_ms" in row else ""
    print(f"\n{row['model']} {row['rows']} x {row['frames']}: kernels' time {table['sum_ms']} ms{replay}")
    print("| kind | ms | share | count |\n|---|---:|---:|---:|")
    for kind, entry in table["kinds"].items():
        print(f"| {kind} | {entry['ms']} | {entry['share']} | {entry['count']} |")
    for entry in table["top"]:
        print(f"  {entry['ms']:>9.3f} ms  x{entry['count']:<5} {entry['kind']:<11} {entry['name']}")


def measure(models: Sequence[str], rows: Sequence[int], frames: Sequence[int], repeats: int, device: str,
            compile_mode: str = "off", kernels: bool = False, attentions: Sequence[str] = ("sdpa",),
            real_share: float = 1.0) -> list[dict[str, Any]]:
    from chatterbox.models.s3gen import S3Gen

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    out = []
    for model in models:
        meanflow, steps = FAMILIES[model]
        torch.manual_seed(0)
        s3gen = S3Gen(meanflow=meanflow).eval() if meanflow else S3Gen().eval()
        decoder = s3gen.flow.decoder.to(device=device, dtype=dtype)
        for attention in attentions:
            solver = flow_solver(decoder, steps=steps, device=device, dtype=dtype, compile=compile_mode,
                                 attention=attention)
            for f in frames:
                for r in rows:
                    out.append(_measure_row(solver, model, r, f, repeats, device, kernels, real_share))
            del solver
        del decoder, s3gen
        if cuda:
            torch.cuda.empty_cache()
    return out


def _measure_row(solver: CfmSolver, model: str, r: int, f: int, repeats: int, device: str, kernels: bool,
                 real_share: float) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    inputs = solve_inputs(r, f, device, real_share=real_share)
    solver.solve_eager(*inputs)  # first-call costs (and a compile) out
    counted = count_solve(solver, inputs)
    ops = counted.ops
    row: dict[str, Any] = {
        "model": model, "rows": r, "frames": f, "real_frames": sum(real_lengths(r, f, real_share)),
        "steps": solver.steps, "compile": solver.compile, "attention": solver.attention,
        "ops_per_solve": sum(ops.values()), "gflop_per_solve": round(counted.flops / 1e9, 1),
        "eager_ms": round(_timed(lambda: solver.solve_eager(*inputs), repeats, device), 2),
        "top_ops": dict(ops.most_common(8)),
    }
    if solver.attention_note:
        row["attention_note"] = solver.attention_note
    if cuda or kernels:  # one profiled solve serves the kernel count and the table
        spans, counts = profiled(lambda: solver.solve_eager(*inputs), cuda)
    if cuda:
        row["kernels_per_solve"] = sum(counts.values())
        solver.capture(GraphBuckets(rows=(r,), frames=(f,), max_cells=r * f))
        row["graph_ms"] = round(_timed(lambda: solver.solve(*inputs), repeats, device), 2)
        row["graph_tflops"] = round(counted.flops / 1e9 / row["graph_ms"], 1)  # GFLOP/ms
        solver.buckets, solver._graphs = None, {}
    if kernels:
        row["kernel_table"] = kernel_table(spans, counts)
        print_kernel_table(row)
    print({k: v for k, v in row.items() if k not in ("top_ops", "kernel_table")}, flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.tools.bench_cfm_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    p.add_argument("--rows", default="1,8,32", help="batch sizes (comma-separated)")
    p.add_argument("--frames", default="546,646", help="window widths in mel frames (comma-separated)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", default="off", choices=VOCODER_COMPILE_CHOICES, help="the solver's vocoder_compile")
    p.add_argument("--attention", default="sdpa", help="comma-separated attention modes (vocoder_attention): sdpa, varlen")
    p.add_argument("--real-frames", type=float, default=1.0,
                   help="the rows' real frames: from this share of the width up to all of it (1: no padding)")
    p.add_argument("--device", default=None, help="default: cuda if there is one")
    p.add_argument("--kernel-table", action="store_true",
                   help="each row's time by kind of kernel (matrix products, attention, ...): one profiled eager solve")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(FAMILIES):
        p.error(f"--models: some of {', '.join(FAMILIES)}")
    attentions = [a for a in args.attention.split(",") if a]
    if not attentions or set(attentions) - set(ATTENTION_MODES):
        p.error(f"--attention: some of {', '.join(ATTENTION_MODES)}")
    if not 0.0 < args.real_frames <= 1.0:
        p.error("--real-frames: a share in (0, 1]")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure(models, [int(v) for v in args.rows.split(",") if v], [int(v) for v in args.frames.split(",") if v],
                   max(1, args.repeats), device, args.compile, kernels=args.kernel_table, attentions=attentions,
                   real_share=args.real_frames)
    print_rows(rows, ["model", "rows", "frames", "real_frames", "steps", "compile", "attention", "ops_per_solve",
                      "gflop_per_solve", "kernels_per_solve", "eager_ms", "graph_ms", "graph_tflops"])
    if args.json:
        write_result(args.json, "gateway.tools.bench_cfm_ops", argv, device, rows, torch=torch.__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
