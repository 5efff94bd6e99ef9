"""How much a decode loop elsewhere on the GPU slows a vocoder-sized solve: the question behind
issue 18's first-audio timeline (the CFM of the first window took 117 ms in the server against
~40 ms in the isolated profile while vLLM's engine-core process decoded T3 on the same GPU).

Pure PyTorch, no model: a "solve" is a fixed chain of batched products sized to take about
``--solve-ms`` alone (the CFM window's scale); a "decoder" is T3's decode cadence at batch 1 (a
chain of small products for ``--decode-gpu-ms``, a synchronize, host time for
``--decode-host-ms``: 2.55 ms a token in the server, the GPU idle over half of it). Each
scenario times the solve's wall clock (launch to synchronize) and the decoder's steps per
second:

- ``alone``: the solve with nothing else on the GPU;
- ``thread``: the decoder in a thread of the same process on its own CUDA stream (one context:
  kernels of both may run at once);
- ``thread, decoder high priority``: the same on a high-priority stream (``vllm_engine_stream_priority
  = "high"``): the GPU's block scheduler then runs the decoder's kernels before the solve's
  waiting ones, so T3's steps need not queue behind a vocoder batch;
- ``process``: the decoder in a second process (two contexts: without MPS the GPU time-slices
  between them, which is how vLLM's engine core and our vocoder share the card today);
- ``decoder alone``: its steps per second with no solve (what the others lose);
- with ``--green-sms N,...``, for each N: ``solve on N SMs alone`` and ``thread, solve on N
  SMs``: the solve's graph replayed on the stream of a CUDA green context of N SMs
  (``vocoder_sms``), the decoder on the whole card. Kernels are not pre-empted: a decode
  kernel waits for an SM that the solve's blocks leave free, and a solve confined to N SMs
  leaves the rest free all the time. The first row says whether a graph replay keeps to the
  partition (a solve that fills the card slows by about the SMs taken away), the second what
  the decoder gets back.

The solves run back to back (a vocoder never idle, as under load), so the decoder's rate in
each row against ``decoder alone`` is what T3 loses to the vocoder's work in that arrangement.

    python -m gateway.tools.gpu.contention --json out.json

prints a table; a ``process`` row far above ``thread`` says the cross-process split costs the
vocoder, and that T3 and S3Gen belong in one CUDA context (or under MPS).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time

import torch

from gateway.engine.vllm.graph_calls import capture_graph, capture_stream


def _decode_weights(device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    return [torch.randn(1024, 1024, device=device, dtype=torch.bfloat16, generator=gen) / 32 for _ in range(8)]


def _decode_step(x: torch.Tensor, weights: list[torch.Tensor], chain: int) -> torch.Tensor:
    for i in range(chain):
        x = torch.tanh(x @ weights[i % len(weights)])
    return x


def _decode_chain_for(gpu_ms: float, device: torch.device) -> int:
    """How many small products make ``gpu_ms`` of one decode step on this card."""
    weights = _decode_weights(device)
    x = torch.randn(1, 1024, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        _decode_step(x, weights, 100)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        _decode_step(x, weights, 100)
    torch.cuda.synchronize(device)
    per = (time.perf_counter() - start) / 1000
    return max(1, round(gpu_ms / 1000 / per))


def _decode_loop(chain: int, host_s: float, stop: threading.Event | None, stop_at: float | None,
                 stream: torch.cuda.Stream | None, counts: list[int]) -> None:
    device = torch.device("cuda", 0)
    weights = _decode_weights(device)
    x = torch.randn(1, 1024, device=device, dtype=torch.bfloat16)
    with torch.cuda.stream(stream):  # None: the current stream
        while not (stop is not None and stop.is_set()) and not (stop_at is not None and time.time() >= stop_at):
            _decode_step(x, weights, chain)
            (stream or torch.cuda.current_stream()).synchronize()
            counts[0] += 1
            time.sleep(host_s)


def _decoder_process(chain: int, host_s: float, start_at: float, stop_at: float, out: mp.Queue) -> None:
    torch.cuda.init()
    counts = [0]
    while time.time() < start_at:
        time.sleep(0.001)
    began = time.time()
    _decode_loop(chain, host_s, None, stop_at, None, counts)
    out.put(counts[0] / (time.time() - began))


def _solve_setup(device: torch.device, batch: int, frames: int, width: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(batch, frames, width, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(width, width, device=device, dtype=torch.bfloat16, generator=gen) / width**0.5
    return x, w


def _solve(x: torch.Tensor, w: torch.Tensor, ops: int) -> torch.Tensor:
    y = x
    for _ in range(ops):
        y = torch.nn.functional.silu(y @ w)  # a product and an elementwise op, as the estimator's blocks
    return y


def _captured(x: torch.Tensor, w: torch.Tensor, ops: int,
              stream: torch.cuda.Stream | None = None) -> torch.cuda.CUDAGraph:
    """The solve as one graph replay, captured as the vocoder's graphs are
    (:func:`gateway.engine.vllm.graph_calls.capture_graph`); on ``stream`` when given (a green
    context's: a graph keeps to the SMs of the context it was captured in, wherever it is
    replayed; one captured outside replays on the whole card even on a green context's stream,
    measured on an H100 2026-12-05)."""
    with capture_stream(stream):
        graph, _ = capture_graph(lambda a, b: _solve(a, b, ops), [x, w], None)
    torch.cuda.synchronize()
    return graph


def _time_solves(graph: torch.cuda.CUDAGraph, seconds: float, stream: torch.cuda.Stream | None = None) -> list[float]:
    """Replays of a graph captured beforehand: as the vocoder's, captured once at start (a
    capture while the decode thread synchronises its stream fails: capture mode is global);
    on ``stream`` when given (a green context's)."""
    times = []
    until = time.perf_counter() + seconds
    with torch.cuda.stream(stream):  # None: the current stream
        while time.perf_counter() < until:
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return times


def _with_decoder(graph: torch.cuda.CUDAGraph, seconds: float, chain: int, host_s: float, priority: int,
                  solve_stream: torch.cuda.Stream | None = None) -> tuple[list[float], float]:
    """The solves' times and the decoder's steps per second, the decoder in a thread."""
    stop, counts = threading.Event(), [0]
    stream = torch.cuda.Stream(torch.device("cuda", 0), priority=priority)  # -1: PyTorch's high-priority pool
    thread = threading.Thread(target=_decode_loop, args=(chain, host_s, stop, None, stream, counts))
    began = time.time()
    thread.start()
    times = _time_solves(graph, seconds, solve_stream)
    stop.set()
    thread.join()
    return times, counts[0] / (time.time() - began)


def _row(scenario: str, times: list[float], steps: float | None) -> dict[str, object]:
    return {"scenario": scenario, "solve_p50_ms": statistics.median(times) if times else None,
            "solve_max_ms": max(times) if times else None, "solves": len(times), "decode_steps_per_s": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solve-ms", type=float, default=40.0, help="the solve's time alone (the CFM window's)")
    parser.add_argument("--batch", type=int, default=2, help="rows of the solve (2: one request with CFG)")
    parser.add_argument("--frames", type=int, default=650, help="mel frames of a window, prompt included")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--decode-gpu-ms", type=float, default=1.0)
    parser.add_argument("--decode-host-ms", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=6.0, help="per scenario")
    parser.add_argument("--green-sms", default="", help="comma-separated SM counts: the solve on a CUDA green "
                        "context of that many SMs, alone and beside the decoder (vocoder_sms)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("contention: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    x, w = _solve_setup(device, args.batch, args.frames, args.width)
    one = statistics.median(_time_solves(_captured(x, w, 100), 1.0)) / 100
    ops = max(1, round(args.solve_ms / one))
    graph = _captured(x, w, ops)
    chain = _decode_chain_for(args.decode_gpu_ms, device)
    host_s = args.decode_host_ms / 1000
    rows = []

    rows.append(_row("alone", _time_solves(graph, args.seconds), None))

    for scenario, priority in (("thread", 0), ("thread, decoder high priority", -1)):
        rows.append(_row(scenario, *_with_decoder(graph, args.seconds, chain, host_s, priority)))

    for sms in [int(n) for n in args.green_sms.split(",") if n.strip()]:
        from torch.cuda.green_contexts import GreenContext

        green = GreenContext.create(sms, device.index or 0)
        stream = green.Stream()
        on_green = _captured(x, w, ops, stream)
        rows.append(_row(f"solve on {sms} SMs alone", _time_solves(on_green, args.seconds, stream), None))
        rows.append(_row(f"thread, solve on {sms} SMs",
                         *_with_decoder(on_green, args.seconds, chain, host_s, 0, stream)))

    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start_at = time.time() + 8.0  # the child's CUDA start-up happens before the window
    proc = ctx.Process(target=_decoder_process, args=(chain, host_s, start_at, start_at + args.seconds + 1.0, out))
    proc.start()
    while time.time() < start_at + 0.5:
        time.sleep(0.01)
    times = _time_solves(graph, args.seconds)
    steps = out.get(timeout=60)
    proc.join(timeout=30)
    rows.append({"scenario": "process", "solve_p50_ms": statistics.median(times), "solve_max_ms": max(times),
                 "solves": len(times), "decode_steps_per_s": steps})

    counts = [0]
    began = time.time()
    _decode_loop(chain, host_s, None, began + min(args.seconds, 3.0), torch.cuda.Stream(device), counts)
    rows.append({"scenario": "decoder alone", "solve_p50_ms": None, "solve_max_ms": None, "solves": 0,
                 "decode_steps_per_s": counts[0] / (time.time() - began)})

    print(f"solve: {ops} x ({args.batch}x{args.frames}x{args.width} product + silu); "
          f"decode step: {chain} products of 1x1024x1024 then {args.decode_host_ms} ms on the host")
    print("| scenario | solve p50 ms | solve max ms | solves | decode steps/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        rate = "-" if r["decode_steps_per_s"] is None else f"{r['decode_steps_per_s']:.0f}"
        p50, top = ("-", "-") if r["solve_p50_ms"] is None else (f"{r['solve_p50_ms']:.1f}", f"{r['solve_max_ms']:.1f}")
        print(f"| {r['scenario']} | {p50} | {top} | {r['solves']} | {rate} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
                       "command": "python -m gateway.tools.gpu.contention " + " ".join(argv or sys.argv[1:]),
                       "solve_ops": ops, "decode_chain": chain, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
