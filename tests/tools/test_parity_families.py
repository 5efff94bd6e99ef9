"""The families' parity tool on the CPU: its T3 stage in dry-run mode (2-layer T3s, a CPU
stand-in decoding the served prompt rows where the GPU runs vLLM), so the GPU visit runs a
tool already run here. Its near-tie criterion: tests/tools/test_parity_t3.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from gateway.models.families import MULTILINGUAL, TURBO
from gateway.tools import parity_families


@pytest.mark.slow
def test_the_t3_stage_runs_in_dry_run_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2-layer T3s, 12 tokens: the served prompt rows (our builders) decode to upstream's
    greedy tokens through the CPU stand-in, for both families and both dtype rows. The run's
    scratch (each family's checkpoint, ~0.5 GiB) is gone afterwards: left behind, every run
    of the tool took a GiB of the temp disk, and CI ran out of it."""
    torch.set_num_threads(2)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results = parity_families.check_t3((MULTILINGUAL, TURBO), n_tokens=12, dry_run=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("families-parity-")] == []
    assert len(results) == 2 * (4 + 5)  # per family: fp32's 4 checks, bf16's 4 and the same seed twice
    assert all(ok for _, ok, _ in results), [r for r in results if not r[1]]
    assert all("dry run" in name for name, _, _ in results)
    assert sum("all 12 tokens equal" in detail for _, _, detail in results) == 2 * 2 * 3
    assert sum(name.endswith("the same seed twice") for name, _, _ in results) == 2


def _lp(rows: list[list[float]]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(rows), dim=-1)


def test_batched_and_single_may_part_only_on_a_near_tie() -> None:
    """2026-12-04, H200, Multilingual fp32: 2/3 requests identical batched and alone; the third
    parted at the reference's near tie (top-2 margin 0.006 under a 0.037 logit error). That is
    vLLM's batch-dependent GEMM tiling, not state crossing rows; a parting elsewhere still fails."""
    ref_lp = _lp([[2.0, 1.0, 0.0]] * 4)
    served = [[[0, float(ref_lp[0, 0])], [1, float(ref_lp[0, 1]) - 0.1]]] * 4  # error 0.1 measured
    ref = [0, 0, 0, 0]
    same = parity_families.batch_verdict([ref], [ref], [ref], [([1.0] * 4, ref_lp)], [served])
    assert same == (True, "")
    tie = ([1.0, 1.0, 0.15, 1.0], ref_lp)  # a margin of 0.15 at token 2: within 2 x 0.1
    ok, detail = parity_families.batch_verdict([ref], [ref], [[0, 0, 1, 0]], [tie], [served])
    assert ok and "request 0 parts at token 2 on a near tie" in detail
    wide = ([1.0, 1.0, 0.5, 1.0], ref_lp)  # a real preference: the paths must agree there
    ok, detail = parity_families.batch_verdict([ref], [ref], [[0, 0, 1, 0]], [wide], [served])
    assert not ok and "0.5000 > 0.2000" in detail
    # parting after the batched path already left the reference: no margin describes it
    ok, detail = parity_families.batch_verdict([ref], [[1, 0, 0, 0]], [[1, 0, 1, 0]], [tie], [served])
    assert not ok and "off the reference" in detail


def test_a_parting_at_the_first_token_is_judged_by_that_steps_own_error() -> None:
    # no matched step before it: the bound comes from the step's uncontested tokens, as in the
    # per-case criterion (a bound of 0 would fail every first-step tie)
    ref_lp = _lp([[3.0, 2.95, 2.0, 1.0, 0.5, -1.0]] * 3)
    errors = {0: 0.0, 1: 0.1, 2: 0.0, 3: 0.06, 4: -0.04}  # 0.06 measured on ids 2, 3, 4
    served = [[[tid, float(ref_lp[0, tid]) + e - 3.0] for tid, e in errors.items()]] * 3
    ok, detail = parity_families.batch_verdict([[0, 0, 0]], [[1, 0, 0]], [[0, 0, 0]],
                                               [([0.5, 1.0, 1.0], ref_lp)], [served])
    assert not ok and "margin 0.5000 > 0.1200" in detail  # a real preference at token 0
    ok, detail = parity_families.batch_verdict([[0, 0, 0]], [[0, 0, 0]], [[1, 0, 0]],
                                               [([0.05, 1.0, 1.0], ref_lp)], [served])
    assert ok and "parts at token 0 on a near tie (0.0500 <= 0.1200)" in detail


def test_the_same_seed_twice_must_give_the_same_tokens() -> None:
    """The check behind the 2026-12-05 H100 failure of the e2e same-seed test (the CFG
    families parted at the 8th-9th token): two whole-prompt prefills with one seed must agree;
    where a prefix-cache read parts from them is reported, not judged."""
    ok, detail = parity_families.seed_verdict({"full": [5, 6, 7], "full_again": [5, 6, 7], "cached": [5, 6, 9]})
    assert ok and detail == "3 tokens, equal; a third run reading the prompt from the prefix cache: parts at token 2"
    ok, detail = parity_families.seed_verdict({"full": [5, 6, 7], "full_again": [5, 8, 7], "cached": [5, 6, 7]})
    assert not ok and "parting at token 1" in detail and detail.endswith("cache: equal")
    assert not parity_families.seed_verdict({"full": [], "full_again": [], "cached": []})[0]  # nothing sampled


def test_the_seeded_runs_sample_as_the_engine_serves_each_family() -> None:
    original = parity_families.seeded_fields(MULTILINGUAL, 40)
    assert original["seed"] == parity_families.SEED and original["skip_reading_prefix_cache"] is True
    assert (original["temperature"], original["min_p"], original["top_k"], original["repetition_penalty"]) == (
        0.8, 0.05, 0, 2.0)  # Multilingual's upstream defaults
    turbo = parity_families.seeded_fields(TURBO, 40)
    assert (turbo["top_k"], turbo["top_p"], turbo["min_p"]) == (1000, 0.95, 0.0)
    assert turbo["max_tokens"] == 40 and turbo["stop_token_ids"] == [6562]


def test_a_bf16_worker_without_seeded_runs_fails_that_check(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    tokens = [[1, 2, 3]] * 3
    lps = [[[[1, -0.1], [2, -3.0]]] * 3] * 3
    out.write_text(__import__("json").dumps({"tokens": tokens, "single": tokens, "logprobs": lps, "init_s": 1.0}))
    forced = [([5.0, 5.0, 5.0], _lp([[0.0, 3.0, 0.0, 0.0]] * 3))] * 3
    results = parity_families._judge(TURBO, "bfloat16", "bfloat16", 0, out, tokens, forced)
    (seed,) = [r for r in results if r[0].endswith("the same seed twice")]
    assert seed[1] is False and "no seeded runs" in seed[2]
    assert not [r for r in parity_families._judge(TURBO, "float32", "float32", 0, out, tokens, forced)
                if r[0].endswith("the same seed twice")]  # fp32 runs have none to judge
