"""How the audio of consecutive text chunks joins, the same in every engine.

A request's text is split into chunks that are synthesised one after another. Each chunk's
audio starts and ends at silence (short raised-cosine edges), so chunks meet without a
click whatever the waveform does at the cut; and each chunk is sampled from its own seed,
derived from the request's, so a seeded request is reproducible and its chunks still differ.
"""

from __future__ import annotations

import hashlib

import numpy as np

from gateway.engine.base import SAMPLE_RATE

EDGE_FADE_IN_S = 0.005
EDGE_FADE_OUT_S = 0.010


def fade_edges(
    samples: np.ndarray, *, fade_in: bool = True, fade_out: bool = True, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """A float32 copy of ``samples`` with a raised-cosine fade-in and/or fade-out."""
    out = samples.astype(np.float32, copy=True)
    for seconds, at_start, wanted in ((EDGE_FADE_IN_S, True, fade_in), (EDGE_FADE_OUT_S, False, fade_out)):
        # Both edges share a short chunk equally; a lone edge may use all of it.
        n = min(int(seconds * sample_rate), out.size // 2 if fade_in and fade_out else out.size)
        if not wanted or n <= 0:
            continue
        ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n, dtype=np.float32))).astype(np.float32)
        if at_start:
            out[:n] *= ramp
        else:
            out[-n:] *= ramp[::-1]
    return out


def chunk_seed(seed: int, index: int) -> int:
    """A per-chunk seed: the same request gives the same audio, chunks differ from each other."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
