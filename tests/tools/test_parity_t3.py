"""The near-tie criterion every T3 parity check judges by (``gateway/tools/parity_t3.py``), on
the CPU: served log-probabilities built from a reference's with known errors, so each verdict
follows from numbers the test states."""

from __future__ import annotations

import pytest
import torch

from gateway.tools.parity_t3 import (
    diverging_step_error,
    first_mismatch,
    logit_error,
    near_tie_verdict,
)


def _logprobs(rows: list[list[float]]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(rows), dim=-1)


def _served(ref_row: torch.Tensor, errors: dict[int, float], shift: float = -3.0) -> list[list[float]]:
    """vLLM-style top-k pairs for the listed ids: the reference's log-probabilities plus each
    id's error, all shifted by one constant (the served normalisation differs)."""
    return [[tid, float(ref_row[tid]) + err + shift] for tid, err in errors.items()]


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


# A first step where the reference prefers id 0 over id 1 by ``margin``; the served logits
# carry errors of at most 0.06 on ids 2, 3, 4 (uncontested) and whatever flips ids 0 and 1.
UNCONTESTED_ERRORS = {2: 0.0, 3: 0.06, 4: -0.04}


def _step0_case(margin: float, contested_flip: float) -> tuple[torch.Tensor, list, list[float]]:
    ref_lp = _logprobs([[3.0, 3.0 - margin, 2.0, 1.0, 0.5, -1.0]] * 3)
    served_step0 = _served(ref_lp[0], {1: contested_flip, 0: 0.0, **UNCONTESTED_ERRORS})
    later = _served(ref_lp[1], {1: 0.0, 0: 0.0, 2: 0.0})
    return ref_lp, [served_step0, later, later], [margin, 1.0, 1.0]


def test_the_diverging_step_is_measured_without_its_contested_pair() -> None:
    ref_lp, served, _ = _step0_case(0.05, contested_flip=0.1)
    err, tokens = diverging_step_error(ref_lp, served, 0, {0, 1})
    assert tokens == 3  # ids 2, 3, 4
    assert err == pytest.approx(0.06, abs=1e-5)  # anchored at id 2: |0.06 - 0| and |-0.04 - 0|
    # with the contested ids, the served top's own error (0.1, enough to flip a 0.05 margin)
    # enters every pair: 0.14 > the margin by construction, which would excuse any divergence
    assert logit_error(ref_lp, served, 1) == pytest.approx(0.14, abs=1e-5)


def test_a_first_step_near_tie_passes_within_the_bound_measured_there() -> None:
    """Multilingual bf16 case 0 of 2026-12-04 parted at step 0 with a margin of 0.0911: the
    old criterion had no matched step, measured 0 and failed it. Now the step's own
    uncontested tokens give the bound (2 x 0.06 here)."""
    ref_lp, served, margins = _step0_case(0.05, contested_flip=0.1)
    ok, detail = near_tie_verdict([0, 0, 0], [1, 0, 0], margins, ref_lp, served)
    assert ok, detail
    assert "equal for 0/3" in detail and "diverging step 0.0600 over 3 uncontested tokens" in detail
    assert "(must be <= 0.1200)" in detail


def test_a_first_step_divergence_with_a_large_margin_fails() -> None:
    # the served model flips a pair the reference separates by 0.5: the uncontested tokens
    # show an error of 0.06, so 0.5 is no near tie, however wrong the contested pair is
    ref_lp, served, margins = _step0_case(0.5, contested_flip=0.6)
    ok, detail = near_tie_verdict([0, 0, 0], [1, 0, 0], margins, ref_lp, served)
    assert not ok and "(must be <= 0.1200)" in detail


def test_nothing_measured_at_the_first_step_is_no_excuse() -> None:
    """Exact uncontested tokens (error 0) or too few of them: the bound is 0 and even a tiny
    margin fails; no error is assumed."""
    ref_lp = _logprobs([[3.0, 2.99, 2.0, 1.0, 0.5, -1.0]] * 2)
    exact = [_served(ref_lp[0], {1: 0.02, 0: 0.0, 2: 0.0, 3: 0.0}), _served(ref_lp[1], {0: 0.0, 1: 0.0})]
    ok, detail = near_tie_verdict([0, 0], [1, 0], [0.01, 1.0], ref_lp, exact)
    assert not ok and "(must be <= 0.0000)" in detail
    thin = [_served(ref_lp[0], {1: 0.02, 0: 0.0, 2: 0.3}), _served(ref_lp[1], {0: 0.0, 1: 0.0})]
    assert diverging_step_error(ref_lp, thin, 0, {0, 1}) == (0.0, 0)  # one uncontested token: no pair
    ok, _ = near_tie_verdict([0, 0], [1, 0], [0.01, 1.0], ref_lp, thin)
    assert not ok


def test_a_served_stop_at_the_diverging_step_leaves_its_top_out() -> None:
    """The served decode stopped where the reference went on: the stop token (absent from the
    served tokens) is its raw top there and is contested too."""
    ref_lp = _logprobs([[0.0, 3.0, 2.95, 2.0, 1.0, 0.5]] * 2)
    stop = 0  # the served side ranks id 0 first at step 1, far above the reference
    served = [_served(ref_lp[0], {1: 0.0, 2: 0.0}), _served(ref_lp[1], {stop: 5.0, 1: 0.0, 3: 0.05, 4: 0.0, 5: 0.0})]
    err, tokens = diverging_step_error(ref_lp, served, 1, {1})
    assert tokens == 3 and err == pytest.approx(0.05, abs=1e-5)  # ids 3, 4, 5: id 0 and id 1 left out
