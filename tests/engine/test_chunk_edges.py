"""Chunk joins shared by every engine: edge fades and per-chunk seeds."""

from __future__ import annotations

import numpy as np

from gateway.engine.chunk_edges import EDGE_FADE_IN_S, chunk_seed, fade_edges


def test_fade_edges() -> None:
    samples = np.ones(2400, dtype=np.float32)
    faded = fade_edges(samples)
    assert faded[0] == 0 and faded[-1] == 0 and faded[1200] == 1
    assert np.all(np.diff(faded[:120]) >= 0) and np.all(np.diff(faded[-240:]) <= 0)
    assert fade_edges(np.zeros(0, dtype=np.float32)).size == 0
    assert samples[0] == 1  # a copy: the input is untouched


def test_fade_in_alone_leaves_the_end() -> None:
    samples = np.ones(2400, dtype=np.float32)
    faded = fade_edges(samples, fade_out=False)
    n = int(EDGE_FADE_IN_S * 24_000)
    assert faded[0] == 0 and np.all(faded[n:] == 1)
    short = fade_edges(np.ones(50, dtype=np.float32), fade_out=False)  # shorter than the ramp
    assert short[0] == 0 and short[-1] == 1


def test_chunk_seeds_are_stable_distinct_and_fit_63_bits() -> None:
    seeds = [chunk_seed(42, i) for i in range(50)]
    assert seeds == [chunk_seed(42, i) for i in range(50)]
    assert len(set(seeds)) == 50 and chunk_seed(43, 0) != seeds[0]
    assert all(0 <= s < 2**63 for s in seeds)
