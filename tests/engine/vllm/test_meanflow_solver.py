"""Turbo's mean-flow S3Gen in the batched vocoder, on the CPU: the solver against upstream's
``basic_euler`` decoder, no host synchronisation, padding, and the whole vocoder parity set
(upstream ``S3Gen(meanflow=True).inference`` == our one-shot, batched == alone, streamed
windows vs one-shot) at tiny sizes. CUDA graphs of the same solve: ``tools/parity_families``
on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from gateway.engine.vllm.cfm_solver import CfmSolver, GraphBuckets
from gateway.engine.vllm.meanflow_solver import MeanFlowSolver, flow_solver, is_meanflow
from gateway.tools import parity_families, parity_vocoder
from gateway.tools.parity_vocoder import Sizes

SIZES = Sizes(prompt_tokens=12, utterances=(27, 15), flow_steps=2, first_window=6, window=8, left_context=4)


@pytest.fixture(scope="module")
def decoder(tiny_cfm_decoder):
    return tiny_cfm_decoder(meanflow=True)


@pytest.fixture(scope="module")
def meanflow_s3gen():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield parity_families.meanflow_s3gen("cpu")  # random weights, the (t, r) mixer too
    torch.set_num_threads(threads)


def test_the_solver_is_picked_by_the_decoder(decoder, tiny_cfm_decoder) -> None:
    assert is_meanflow(decoder)
    assert type(flow_solver(decoder, steps=2, device="cpu", dtype=torch.float32)) is MeanFlowSolver
    original = tiny_cfm_decoder()
    assert not is_meanflow(original)
    assert type(flow_solver(original, steps=2, device="cpu", dtype=torch.float32)) is CfmSolver
    with pytest.raises(ValueError, match="mean-flow"):
        MeanFlowSolver(original, steps=2, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("steps", [2, 3])
def test_eager_solve_equals_upstream_meanflow_decoder(decoder, cfm_inputs, steps: int) -> None:
    solver = MeanFlowSolver(decoder, steps=steps, device="cpu", dtype=torch.float32)
    noise, mu, mask, spks, cond = cfm_inputs(2, 48, [48, 30], seed=1)
    ours = solver.solve(noise, mu, mask, spks, cond)
    # noised_mels as long as mu: upstream's own randn_like draw is replaced entirely
    ref, _ = decoder(mu=mu, mask=mask, spks=spks, cond=cond, n_timesteps=steps, noised_mels=noise, meanflow=True)
    err = (ours - ref).norm() / ref.norm()
    assert err < 1e-5, err
    assert solver.eager_runs == 1 and solver.graph_replays == 0
    # the time schedule is linear (upstream skips the cosine schedule for mean-flow)
    assert torch.allclose(solver.t_span, torch.linspace(0, 1, steps + 1))


def test_r_matters_so_the_check_above_can_fail(decoder) -> None:
    solver = MeanFlowSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    emb = solver.step_embeddings()
    est = decoder.estimator
    t_only = est.time_mlp(est.time_embeddings(solver.t_span[:-1]))
    assert emb.shape == t_only.shape and not torch.allclose(emb, t_only, atol=1e-3)


def test_eager_solve_never_synchronises_with_the_host(decoder, cfm_inputs, item_calls) -> None:
    solver = MeanFlowSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    args = cfm_inputs(1, 32, [32], seed=2)
    solver.step_embeddings()  # a constant of the model, computed before any graph
    item_calls.clear()
    solver.solve_eager(*args)
    assert item_calls == []
    decoder(mu=args[1], mask=args[2], spks=args[3], cond=args[4], n_timesteps=2, noised_mels=args[0], meanflow=True)
    assert item_calls, "the check must be able to see upstream's synchronisations"


def test_padding_rows_and_frames_does_not_change_real_rows(decoder, cfm_inputs) -> None:
    """What a graph replay does to a batch: pad rows (fully masked) and frames (masked)."""
    solver = MeanFlowSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    noise, mu, mask, spks, cond = cfm_inputs(2, 40, [40, 25], seed=3)
    alone = solver.solve_eager(noise, mu, mask, spks, cond)

    def pad(t, rows, frames):
        if t.dim() == 2:
            out = torch.zeros(rows, t.shape[1])
            out[:t.shape[0]] = t
            return out
        out = torch.zeros((rows, t.shape[1], frames))
        out[:t.shape[0], :, :t.shape[2]] = t
        return out

    padded = solver.solve_eager(*(pad(t, 4, 64) for t in (noise, mu, mask, spks, cond)))
    for i, n in enumerate([40, 25]):
        err = (padded[i, :, :n] - alone[i, :, :n]).norm() / alone[i, :, :n].norm()
        assert err < 1e-5, (i, err)
    assert torch.isfinite(padded).all()


def test_graph_capture_is_the_inherited_one(decoder) -> None:
    """Capture and bucket fitting come from CfmSolver unchanged (no graphs on the CPU)."""
    solver = MeanFlowSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    assert solver.mirrored and solver.cfg_rate == 0.0
    assert solver.capture(GraphBuckets.plan(max_rows=2, max_frames=1024)) == 0.0
    solver.buckets = GraphBuckets.plan(max_rows=2, max_frames=1024)
    assert solver.frames_for(546) == 640


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dynamic", "rows"])
def test_compiled_blocks_compute_the_same_meanflow_solve(decoder, cfm_inputs, mode) -> None:
    """``vocoder_compile`` reaches Turbo's solve too: the same blocks through torch.compile."""
    import torch._dynamo

    torch._dynamo.reset()
    plain = MeanFlowSolver(decoder, steps=2, device="cpu", dtype=torch.float32)
    compiled = MeanFlowSolver(decoder, steps=2, device="cpu", dtype=torch.float32, compile=mode)
    assert compiled.compile == mode
    for rows, frames, valid in ((2, 24, [24, 13]), (3, 40, [40, 7, 31])):
        args = cfm_inputs(rows, frames, valid, seed=rows)
        torch.testing.assert_close(compiled.solve(*args), plain.solve(*args), rtol=1e-4, atol=1e-5)
    assert compiled.compile_error is None


@pytest.mark.slow
def test_vocoder_parity_checks_pass_for_the_meanflow_s3gen(meanflow_s3gen) -> None:
    """The original's vocoder parity set, run on Turbo's S3Gen with 2 mean-flow steps: its
    one-shot equals upstream ``S3Gen(meanflow=True).inference`` (same noise, drawn in
    upstream's order), batching and padding change nothing, streamed windows stay close."""
    results = parity_vocoder.run("cpu", torch.float32, SIZES, s3gen=meanflow_s3gen)
    names = {r.name for r in results}
    assert len(names) == 8 and all(r.passed for r in results), results
    assert "hift: fused kernels == upstream's modules" in names
    upstream = next(r for r in results if r.name.startswith("upstream"))
    assert upstream.value > 90, upstream
    streamed = next(r for r in results if r.name == "vocoder: streamed windows == one-shot")
    assert math.isfinite(streamed.value), "the streamed check must really window the streams"
