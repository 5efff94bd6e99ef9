"""The CFM solve without per-step overhead: same function as upstream's decoder, no host
synchronisation inside, and the graph buckets' arithmetic (capture itself is a GPU check in
``gateway.tools.parity_vocoder``)."""

from __future__ import annotations

import logging

import pytest
import torch

from gateway.engine.vllm.cfm_solver import CfmSolver, GraphBuckets


@pytest.fixture(scope="module")
def decoder():
    from chatterbox.models.s3gen import S3Gen

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield S3Gen().eval().flow.decoder
    torch.set_num_threads(threads)


def test_eager_solve_equals_upstream_decoder(decoder, cfm_inputs) -> None:
    solver = CfmSolver(decoder, steps=3, device="cpu", dtype=torch.float32)
    noise, mu, mask, spks, cond = cfm_inputs(2, 48, [48, 30], seed=1)
    ours = solver.solve(noise, mu, mask, spks, cond)
    ref, _ = decoder(mu=mu, mask=mask, spks=spks, cond=cond, n_timesteps=3, noised_mels=noise)
    err = (ours - ref).norm() / ref.norm()
    assert err < 1e-5, err
    assert solver.eager_runs == 1 and solver.graph_replays == 0


def test_eager_solve_never_synchronises_with_the_host(decoder, cfm_inputs, item_calls) -> None:
    """Upstream's mask helper calls ``.item()`` 17 times a step (a GPU sync each, and no graph
    capture possible); ours builds the masks once and never reads a value back."""
    solver = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    args = cfm_inputs(1, 32, [32], seed=2)
    item_calls.clear()
    solver.solve_eager(*args)
    calls = item_calls
    assert calls == []
    decoder(mu=args[1], mask=args[2], spks=args[3], cond=args[4], n_timesteps=2, noised_mels=args[0])
    assert len(calls) > 0, "the check must be able to see upstream's synchronisations"


def test_padding_rows_and_frames_does_not_change_real_rows(decoder, cfm_inputs) -> None:
    """What a graph replay does to a batch: pad rows (fully masked) and frames (masked)."""
    solver = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    noise, mu, mask, spks, cond = cfm_inputs(2, 40, [40, 25], seed=3)
    alone = solver.solve_eager(noise, mu, mask, spks, cond)

    def pad(t, rows, frames):
        out = torch.zeros((rows,) + t.shape[1:-1] + (frames,)) if t.dim() == 3 else torch.zeros(rows, t.shape[1])
        if t.dim() == 3:
            out[:t.shape[0], :, :t.shape[2]] = t
        else:
            out[:t.shape[0]] = t
        return out

    padded = solver.solve_eager(*(pad(t, 4, 64) for t in (noise, mu, mask, spks, cond)))
    for i, n in enumerate([40, 25]):
        err = (padded[i, :, :n] - alone[i, :, :n]).norm() / alone[i, :, :n].norm()
        assert err < 1e-5, (i, err)
    assert torch.isfinite(padded).all()


def test_graph_buckets_are_bounded_and_fit_the_smallest_shape() -> None:
    b = GraphBuckets.plan(max_rows=64, max_frames=1536, min_frames=512, max_cells=65536)
    assert b.rows == (1, 2, 4, 8, 16, 32, 64)
    assert b.frames[0] == 512 and b.frames[-1] == 1536
    assert all(f % 32 == 0 for f in b.frames)
    assert all(nxt <= 1.25 * prev + 32 for prev, nxt in zip(b.frames, b.frames[1:])), "at most ~25% padding"
    shapes = b.shapes()
    assert all(r * f <= 65536 for r, f in shapes) and (64, 1536) not in shapes
    assert len(shapes) < 50
    assert b.fit(3, 100) == (4, 512)
    assert b.fit(1, 513) == (1, b.frames[1])
    assert b.fit(1, 1537) is None and b.fit(65, 100) is None
    assert b.fit(64, 1400) is None, "over the batch budget: eager"
    assert GraphBuckets.plan(max_rows=5, max_frames=600).rows == (1, 2, 4, 5)


def test_frames_for_pads_to_a_captured_width_only_when_graphs_exist(decoder) -> None:
    solver = CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32)
    assert solver.frames_for(546) == 546
    assert solver.capture(GraphBuckets.plan(max_rows=2, max_frames=1024)) == 0.0, "no graphs on the CPU"
    assert solver.frames_for(546) == 546
    solver.buckets = GraphBuckets.plan(max_rows=2, max_frames=1024)
    assert solver.frames_for(546) == 640 and solver.frames_for(2000) == 2000


# --- the estimator's blocks as our functions, compiled or not ------------------------------


def test_our_blocks_compute_upstreams_blocks(tiny_cfm_decoder, cfm_inputs) -> None:
    from gateway.engine.vllm.cfm_solver import _transformer_blocks, plain_transformer_block

    decoder = tiny_cfm_decoder()
    solver = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    assert all(plain_transformer_block(b) for b in _transformer_blocks(decoder.estimator))
    noise, mu, mask, spks, cond = cfm_inputs(2, 24, [24, 13], seed=4)
    ref, _ = decoder(mu=mu, mask=mask, spks=spks, cond=cond, n_timesteps=2, noised_mels=noise)
    ours = solver.solve(noise, mu, mask, spks, cond)
    torch.testing.assert_close(ours[1, :, :13], ref[1, :, :13], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)


def test_a_compile_failure_falls_back_to_the_plain_blocks(tiny_cfm_decoder, cfm_inputs, monkeypatch) -> None:
    from gateway.engine.vllm import cfm_solver

    def broken(block, wqkv, x, bias):
        raise RuntimeError("inductor could not compile this")

    monkeypatch.setattr(cfm_solver, "compiled_blocks", lambda mode, attention: cfm_solver.Blocks(transformer=broken))
    decoder = tiny_cfm_decoder()
    solver = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32, compile="dynamic")
    assert solver.compile == "dynamic"
    args = cfm_inputs(1, 16, [16], seed=5)
    got = solver.solve(*args)
    assert solver.compile == "off" and "could not compile" in solver.compile_error
    torch.testing.assert_close(got, CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32).solve(*args))


@pytest.mark.slow
def test_compiled_blocks_equal_the_plain_ones_for_any_shape_with_one_compile_each(tiny_cfm_decoder, cfm_inputs) -> None:
    """torch.compile (inductor's C++ backend here; Triton on the GPU) of the same functions
    the graphs capture: fp32 results equal, and a second batch shape compiles nothing new
    (``dynamic``: one graph per function and parameter shape, shared by all blocks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    decoder = tiny_cfm_decoder()
    plain = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    compiled = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32, compile="dynamic")
    for rows, frames, valid in ((2, 24, [24, 13]), (3, 40, [40, 7, 31])):
        args = cfm_inputs(rows, frames, valid, seed=rows)
        torch.testing.assert_close(compiled.solve(*args), plain.solve(*args), rtol=1e-4, atol=1e-5)
        if rows == 2:
            graphs = counters["stats"]["unique_graphs"]
    assert compiled.compile == "dynamic" and compiled.compile_error is None
    assert counters["stats"]["unique_graphs"] == graphs <= 4, dict(counters["stats"])


@pytest.mark.slow
def test_rows_compiles_once_per_row_count_whatever_the_width(tiny_cfm_decoder, cfm_inputs) -> None:
    """``rows``: the widths of one row count share a compile (``static`` compiles each of the
    48 buckets of a served start: ~145 s of an H100's start with warm caches), a new row count
    compiles again (its kernels keep the row count constant), and the results are the plain
    blocks' for every shape."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    decoder = tiny_cfm_decoder()
    plain = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    compiled = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32, compile="rows")
    graphs = {}
    for rows, frames, valid in ((2, 24, [24, 13]), (2, 40, [40, 7]), (2, 56, [9, 56]), (3, 40, [40, 7, 31])):
        args = cfm_inputs(rows, frames, valid, seed=rows + frames)
        torch.testing.assert_close(compiled.solve(*args), plain.solve(*args), rtol=1e-4, atol=1e-5)
        graphs[rows, frames] = counters["stats"]["unique_graphs"]
    assert compiled.compile == "rows" and compiled.compile_error is None
    assert graphs[2, 24] == graphs[2, 40] == graphs[2, 56] > 0, graphs
    assert graphs[3, 40] == 2 * graphs[2, 24], graphs


# --- fewer kernels per solve than upstream's estimator ---------------------------------------


def test_a_solve_launches_one_qkv_gemm_per_block_no_pads_and_no_time_mlps(tiny_cfm_decoder, cfm_inputs) -> None:
    """What a solve dispatches (each a kernel on a GPU, where one row's solve is bound by their
    number): per step and transformer block four GEMMs (q, k and v as one, out, the two of the
    feed-forward), not upstream's six; causal convolutions pad inside the convolution (no
    ``F.pad``); the resnets' time projections are constants of the step, not recomputed per
    call; and fewer operations than upstream's decoder overall."""
    from gateway.engine.vllm.cfm_solver import _resnets, _transformer_blocks
    from gateway.tools.bench_cfm_ops import OpCounter, count_ops

    decoder = tiny_cfm_decoder()
    steps = 3
    solver = CfmSolver(decoder, steps=steps, device="cpu", dtype=torch.float32)
    args = cfm_inputs(2, 24, [24, 13], seed=6)
    ours = count_ops(solver, args)
    blocks, resnets = len(_transformer_blocks(decoder.estimator)), len(_resnets(decoder.estimator))
    assert ours["aten.linear"] == steps * 4 * blocks, dict(ours)
    assert ours["aten.mish"] == steps * (2 * resnets + 1), "Mish of each causal block and the final one only"
    assert not {"aten.pad", "aten.constant_pad_nd"} & set(ours), dict(ours)
    upstream = OpCounter()
    with upstream, torch.inference_mode():
        decoder(mu=args[1], mask=args[2], spks=args[3], cond=args[4], n_timesteps=steps, noised_mels=args[0])
    assert upstream.ops["aten.linear"] > ours["aten.linear"] and upstream.ops["aten.pad"] > 0, dict(upstream.ops)
    assert sum(ours.values()) < 0.8 * sum(upstream.ops.values()), (sum(ours.values()), sum(upstream.ops.values()))


def test_estimators_it_does_not_mirror_block_by_block_run_through_their_modules(tiny_cfm_decoder, cfm_inputs,
                                                                               monkeypatch) -> None:
    """A transformer block or resnet of another configuration than upstream's runs through its
    own module (with the precomputed time projection): the same function, never compiled."""
    from gateway.engine.vllm import cfm_solver

    monkeypatch.setattr(cfm_solver, "plain_transformer_block", lambda block: False)
    monkeypatch.setattr(cfm_solver, "plain_resnet_block", lambda resnet: False)
    decoder = tiny_cfm_decoder()
    solver = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32, compile="dynamic")
    assert solver.compile == "off"
    assert (solver.blocks.transformer, solver.blocks.resnet) == (cfm_solver._module_block, cfm_solver.module_resnet_block)
    noise, mu, mask, spks, cond = cfm_inputs(2, 24, [24, 13], seed=7)
    ref, _ = decoder(mu=mu, mask=mask, spks=spks, cond=cond, n_timesteps=2, noised_mels=noise)
    ours = solver.solve(noise, mu, mask, spks, cond)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, :, :13], ref[1, :, :13], rtol=1e-5, atol=1e-5)


def test_causal_conv_pads_inside_the_convolution_as_upstreams_left_pad(tiny_cfm_decoder) -> None:
    from chatterbox.models.s3gen.decoder import CausalConv1d

    from gateway.engine.vllm.cfm_solver import causal_conv

    torch.manual_seed(8)
    for k, dilation in ((3, 1), (5, 2), (1, 1)):
        conv = CausalConv1d(6, 4, k, dilation=dilation).eval()
        x = torch.randn(2, 6, 17)
        torch.testing.assert_close(causal_conv(conv, x), conv(x), rtol=1e-6, atol=1e-6)


def test_graph_buckets_take_extra_widths_within_their_range() -> None:
    b = GraphBuckets.plan(max_rows=4, max_frames=1024, min_frames=512, extra_frames=(540, 650, 300, 2000, 640))
    assert b.frames == (512, 544, 640, 672, 800, 1024), "aligned to 32, in range, no duplicates"
    assert b.fit(1, 541) == (1, 544) and b.fit(3, 650) == (4, 672)
    assert b.padding(540) == pytest.approx(1 - 540 / 544) and b.padding(673) == pytest.approx(1 - 673 / 800)
    assert b.padding(1025) == 1.0, "no graph holds it"


def test_counting_a_compiled_solver_leaves_its_compiled_code_in_use(tiny_cfm_decoder, cfm_inputs) -> None:
    """The benchmark counts a solve's operations before it times the compiled solve: the count
    must not turn the compiled blocks back into plain Python (it did: torch.compile's frames run
    uncompiled after a call under a dispatch mode, so the "compiled" rows timed the plain solve)."""
    from gateway.tools import bench_cfm_ops

    decoder = tiny_cfm_decoder()
    args = cfm_inputs(1, 24, [24], seed=1)
    plain = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    compiled = CfmSolver(decoder, steps=2, device="cpu", dtype=torch.float32, compile="dynamic")
    compiled.solve_eager(*args)

    def compiled_regions() -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            compiled.solve_eager(*args)
        return sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))

    assert compiled_regions() > 0
    counted = bench_cfm_ops.count_solve(compiled, args)
    assert compiled_regions() > 0, "the count must leave the compiled blocks compiled"
    assert counted.ops == bench_cfm_ops.count_solve(plain, args).ops and counted.flops > 0
    assert compiled.compile == "dynamic"


# --- attention within segments (vocoder_attention varlen) ----------------------------------


def test_row_keys_say_where_each_row_starts_and_how_many_keys_are_real() -> None:
    from gateway.engine.vllm.cfm_solver import row_keys

    mask = torch.zeros(3, 1, 5)
    for row, length in enumerate([5, 2, 0]):
        mask[row, :, :length] = 1
    keys = row_keys(mask)
    assert keys.starts.dtype == keys.lengths.dtype == torch.int32
    assert keys.starts.tolist() == [0, 5, 10, 15] and keys.lengths.tolist() == [5, 2, 0]


def _flash_varlen(calls: list[tuple[int, int]]):
    """FlashAttention's variable-length kernel with ``seqused_k`` for the CPU, a row at a time
    through SDPA: each row's queries over its first ``lengths`` keys, zeros for a row of none
    (what the CUDA kernel computes), so the solver's packing can be checked here."""
    import torch.nn.functional as F

    def attend(q, k, v, keys, width):
        calls.append((q.shape[0], width))
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "FlashAttention takes a contiguous last dim"
        starts, lengths = keys.starts.tolist(), keys.lengths.tolist()
        assert starts == list(range(0, q.shape[0] + 1, width)) and len(lengths) == len(starts) - 1
        out = torch.zeros_like(q)
        for start, used in zip(starts, lengths):
            assert 0 <= used <= width
            if used:
                rows = slice(start, start + width)
                real = slice(start, start + used)
                out[rows] = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1), k[real].transpose(0, 1), v[real].transpose(0, 1)).transpose(0, 1)
        return out

    return attend


@pytest.mark.parametrize("meanflow", [False, True], ids=["original", "turbo"])
def test_varlen_attention_solves_what_the_padding_bias_solves(tiny_cfm_decoder, cfm_inputs, monkeypatch,
                                                              meanflow) -> None:
    """Rows of different lengths, padded rows and frames (what a graph bucket holds): each row's
    queries over its real keys give every real frame what SDPA with the key-padding bias gives it."""
    from gateway.engine.vllm import cfm_solver
    from gateway.engine.vllm.meanflow_solver import flow_solver

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(cfm_solver, "varlen_supported", lambda device, dtype, head_dim: None)
    monkeypatch.setattr(cfm_solver, "varlen_attention", _flash_varlen(calls))
    decoder = tiny_cfm_decoder(meanflow=meanflow)
    biased = flow_solver(decoder, steps=2, device="cpu", dtype=torch.float32)
    varlen = flow_solver(decoder, steps=2, device="cpu", dtype=torch.float32, attention="varlen")
    assert (biased.attention, varlen.attention, varlen.attention_note) == ("sdpa", "varlen", None)
    lengths = [24, 13, 0]  # the last row: all padding, as a graph's padded rows
    noise, mu, mask, spks, cond = cfm_inputs(3, 24, lengths, seed=6)
    want, got = biased.solve(noise, mu, mask, spks, cond), varlen.solve(noise, mu, mask, spks, cond)
    for row, length in enumerate(lengths[:2]):
        torch.testing.assert_close(got[row, :, :length], want[row, :, :length], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()
    doubled = 1 if meanflow else 2  # the original's CFG doubles the rows
    blocks = len(cfm_solver._transformer_blocks(decoder.estimator))
    assert calls == [(doubled * 3 * 24, 24)] * (2 * blocks), "every block of both steps, packed rows x frames"


def test_varlen_attention_is_refused_where_flash_attention_cannot_run(decoder) -> None:
    solver = CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32, attention="varlen")
    assert solver.attention == "sdpa" and "CUDA" in solver.attention_note
    from gateway.engine.vllm.cfm_solver import varlen_supported

    cuda = torch.device("cuda")
    assert "bf16" in varlen_supported(cuda, torch.float32, 64)
    assert "multiples of 8" in varlen_supported(cuda, torch.bfloat16, 60)
    assert varlen_supported(cuda, torch.bfloat16, 64) is None
    with pytest.raises(ValueError, match="unknown attention mode"):
        CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32, attention="flash")


def test_auto_attention_takes_varlen_where_it_runs_and_sdpa_quietly_elsewhere(decoder, monkeypatch, caplog) -> None:
    """``auto``: what a default can be on every machine: a CPU server (or a fp32 flow) runs
    SDPA without the warning ``varlen`` asked for by name gives, a GPU one runs varlen."""
    from gateway.engine.vllm import cfm_solver

    with caplog.at_level(logging.INFO, logger=cfm_solver.log.name):
        quiet = CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32, attention="auto")
    assert quiet.attention == "sdpa" and "CUDA" in quiet.attention_note
    assert [r.levelno for r in caplog.records if "varlen" in r.getMessage()] == [logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cfm_solver.log.name):
        asked = CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32, attention="varlen")
    assert asked.attention == "sdpa"
    assert [r.levelno for r in caplog.records if "varlen" in r.getMessage()] == [logging.WARNING]
    monkeypatch.setattr(cfm_solver, "varlen_supported", lambda device, dtype, head_dim: None)  # as on a GPU
    assert CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32, attention="auto").attention == "varlen"
    assert CfmSolver(decoder, steps=1, device="cpu", dtype=torch.float32, attention="sdpa").attention == "sdpa"


# --- stepwise solves (points between steps where other device work may go first) ----------


@pytest.mark.parametrize("meanflow", [False, True], ids=["original", "turbo"])
def test_the_step_a_stepped_graph_replays_is_the_eager_solves_step(tiny_cfm_decoder, cfm_inputs, meanflow) -> None:
    """A stepped graph replays ``indexed_step`` with the step index on the device, its state
    carried in buffers of its own: step by step it computes exactly the eager solve."""
    from gateway.engine.vllm.meanflow_solver import flow_solver

    solver = flow_solver(tiny_cfm_decoder(meanflow=meanflow), steps=3, device="cpu", dtype=torch.float32)
    noise, mu, mask, spks, cond = cfm_inputs(2, 24, [24, 13], seed=7)
    x, k = noise.clone(), torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(solver.steps):
            x = solver.indexed_step(x, k, mu, mask, spks, cond)
            k += 1
    assert torch.equal(x, solver.solve_eager(noise, mu, mask, spks, cond))


def test_a_stepwise_solve_yields_between_steps_and_computes_the_solve(tiny_cfm_decoder, cfm_inputs) -> None:
    solver = CfmSolver(tiny_cfm_decoder(), steps=3, device="cpu", dtype=torch.float32)
    args = cfm_inputs(2, 24, [24, 13], seed=8)
    steps = solver.solve_stepwise(*args)
    assert next(steps) is None and next(steps) is None, "after every step but the last"
    with pytest.raises(StopIteration) as done:
        next(steps)
    assert torch.equal(done.value.value, solver.solve(*args))


class _ReplayedCall:
    """What a CUDA graph does, on the CPU: ``replay`` runs the captured call again on the
    same static inputs and leaves its result in the captured output buffer."""

    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args
        with torch.inference_mode():
            self.out = fn(*args)

    def replay(self) -> None:
        with torch.inference_mode():
            result = self.fn(*self.args)
        if result is not self.out:
            self.out.copy_(result)


@pytest.mark.parametrize("stepped", [False, True], ids=["whole-solve", "stepped"])
def test_solves_through_captured_graphs_equal_the_eager_solve(tiny_cfm_decoder, cfm_inputs, monkeypatch,
                                                             stepped) -> None:
    """The graph objects' own code (static inputs zero-padded, a stepped graph's state and
    step index reset per solve, the result cut to the batch) run on the CPU with capture
    replaced by re-running the captured call: a padded batch solved through them, twice (the
    second solve starts from the first's leftover state), equals the eager solve row for row.
    (The twenty-second visit's parity run found ``steps`` an int on the stepped graph.)"""
    from gateway.engine.vllm import cfm_solver

    def capture(fn, args, pool):
        call = _ReplayedCall(fn, args)
        return call, call.out

    monkeypatch.setattr(cfm_solver, "capture_graph", capture)
    solver = CfmSolver(tiny_cfm_decoder(), steps=3, device="cpu", dtype=torch.float32)
    solver.stepped = stepped
    buckets = GraphBuckets.plan(max_rows=4, max_frames=32)
    solver._capture_all(buckets)
    solver.buckets = buckets
    kind = cfm_solver._StepGraph if stepped else cfm_solver._Graph
    assert solver._graphs and all(type(g) is kind for g in solver._graphs.values())
    for seed in (9, 10):
        args = cfm_inputs(2, 24, [24, 13], seed=seed)
        expected = solver.solve_eager(*args)
        steps = solver.solve_stepwise(*args)
        yields = 0
        while True:
            try:
                assert next(steps) is None
                yields += 1
            except StopIteration as done:
                got = done.value
                break
        assert yields == (solver.steps - 1 if stepped else 0)
        assert got.shape == expected.shape
        for row, frames in enumerate([24, 13]):
            torch.testing.assert_close(got[row, :, :frames], expected[row, :, :frames], rtol=1e-5, atol=1e-5)
    assert solver.graph_replays == 2 and solver.eager_runs == 0
