"""The families' parity tool on the CPU: the near-tie criterion it judges by, and its T3
stage in dry-run mode (2-layer T3s, a CPU stand-in decoding the served prompt rows where
the GPU runs vLLM), so the GPU visit runs a tool already run here."""

from __future__ import annotations

import pytest
import torch

from gateway.models.families import MULTILINGUAL, TURBO
from gateway.tools import parity_families
from gateway.tools.parity_t3 import first_mismatch, logit_error, near_tie_verdict


def _logprobs(rows: list[list[float]]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(rows), dim=-1)


def test_first_mismatch() -> None:
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2, 3], [1, 2]) == 2


def test_logit_error_measures_the_differences_not_the_levels() -> None:
    ref = _logprobs([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    # the served log-probs are the reference's shifted by a constant (normalisation): no error
    same = [[[0, float(ref[0, 0]) - 5], [1, float(ref[0, 1]) - 5]], [[1, float(ref[1, 1])], [2, float(ref[1, 2])]]]
    assert logit_error(ref, same, 2) == pytest.approx(0.0, abs=1e-6)
    off = [[[0, float(ref[0, 0])], [1, float(ref[0, 1]) - 0.25]], [[1, float(ref[1, 1])], [2, float(ref[1, 2])]]]
    assert logit_error(ref, off, 2) == pytest.approx(0.25, abs=1e-6)
    assert logit_error(ref, off, 0) == 0.0  # only the matched steps before a divergence count


def test_a_divergence_passes_only_at_a_near_tie() -> None:
    ref_lp = _logprobs([[2.0, 1.0, 0.0]] * 4)
    served = [[[0, float(ref_lp[0, 0])], [1, float(ref_lp[0, 1]) - 0.1]]] * 4  # error 0.1 measured
    ok, detail = near_tie_verdict([0, 0, 0], [0, 0, 0], [1.0] * 3, ref_lp, served)
    assert ok and "all 3 tokens equal" in detail
    ok, detail = near_tie_verdict([0, 0, 0], [0, 0, 1], [1.0, 1.0, 0.15], ref_lp, served)
    assert ok and "equal for 2/3" in detail  # margin 0.15 <= 2 x 0.1
    ok, _ = near_tie_verdict([0, 0, 0], [0, 0, 1], [1.0, 1.0, 0.5], ref_lp, served)
    assert not ok  # a real disagreement
    ok, _ = near_tie_verdict([0, 0, 0], [0, 0], [1.0] * 3, ref_lp, served)
    assert not ok  # stopping early is a divergence with no margin to excuse it


@pytest.mark.slow
def test_the_t3_stage_runs_in_dry_run_mode() -> None:
    """2-layer T3s, 12 tokens: the served prompt rows (our builders) decode to upstream's
    greedy tokens through the CPU stand-in, for both families and both dtype rows."""
    torch.set_num_threads(2)
    results = parity_families.check_t3((MULTILINGUAL, TURBO), n_tokens=12, dry_run=True)
    assert len(results) == 2 * 2 * 4
    assert all(ok for _, ok, _ in results), [r for r in results if not r[1]]
    assert all("dry run" in name for name, _, _ in results)
    assert sum("all 12 tokens equal" in detail for _, _, detail in results) == 2 * 2 * 3
