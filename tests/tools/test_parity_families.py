"""The families' parity tool on the CPU: its T3 stage in dry-run mode (2-layer T3s, a CPU
stand-in decoding the served prompt rows where the GPU runs vLLM), so the GPU visit runs a
tool already run here. Its near-tie criterion: tests/tools/test_parity_t3.py."""

from __future__ import annotations

import pytest
import torch

from gateway.models.families import MULTILINGUAL, TURBO
from gateway.tools import parity_families


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
