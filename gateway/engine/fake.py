"""A deterministic stand-in engine for fast HTTP tests and for trying the server without weights.

Every "speech token" is a 40 ms tone (25 tokens = 1 s, as with the real model) whose pitch is
drawn from a generator seeded by the voice key, the chunk text and the request seed, so equal
requests give equal audio and a different voice, text or seed gives different audio. Tokens
are produced in small groups with an optional delay between them, so streaming and
cancellation behave as with a real engine; the engine records which jobs were cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from gateway.engine.base import SAMPLE_RATE, SPEECH_TOKENS_PER_SECOND, AudioChunk, Engine, SynthesisJob, T3Stats
from gateway.errors import EngineError
from gateway.models.families import FAMILIES, ORIGINAL

SAMPLES_PER_TOKEN = SAMPLE_RATE // SPEECH_TOKENS_PER_SECOND
# The fake speaks this many tokens per input character (then bounded by max_speech_tokens).
TOKENS_PER_CHAR = 0.5
# Tokens per yielded AudioChunk: small, so a long chunk streams in several pieces.
TOKENS_PER_PIECE = 10
# Seed used when a request gives none, so the fake stays deterministic.
DEFAULT_SEED = 0


class FakeEngine(Engine):
    name = "fake"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        *,
        model_id: str = "fake-chatterbox",
        models: tuple[str, ...] = tuple(FAMILIES),
        start_delay_s: float = 0.0,
        piece_delay_s: float = 0.0,
        fail_start: Exception | None = None,
        fail_after_pieces: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.models = models
        """Families it speaks (all, by default: which are *loaded* is the server's setting)."""
        self.start_delay_s = start_delay_s
        self.piece_delay_s = piece_delay_s
        self.fail_start = fail_start
        self.fail_after_pieces = fail_after_pieces
        """Raise EngineError after yielding this many pieces of a job (tests of mid-stream failure)."""
        self.started = False
        self.closed = False
        self.jobs: list[SynthesisJob] = []
        """Every job handed to synthesize(), in order (tests inspect params and chunks)."""
        self.completed: list[str] = []
        self._t3_counts: dict[str, T3Stats] = {}
        """Per model, the counts behind :meth:`t3_stats`."""
        self.cancelled: list[str] = []
        """Request ids whose audio iterator was closed before it finished."""
        self.failed: list[str] = []
        self.conditionals_computed = 0

    async def start(self) -> None:
        if self.start_delay_s:
            await asyncio.sleep(self.start_delay_s)
        if self.fail_start is not None:
            raise self.fail_start
        self.started = True

    async def close(self) -> None:
        self.closed = True

    # --- voices: real files in, real files out ------------------------------------------------

    def weights_id(self, model: str) -> str:
        return self.model_id if model == ORIGINAL else f"{self.model_id}/{model}"

    def compute_conditionals(self, clip: Path, model: str = ORIGINAL) -> dict[str, Any]:
        data = Path(clip).read_bytes()
        if not data:
            raise ValueError(f"voice clip {clip} is empty")
        self.conditionals_computed += 1
        return {"digest": hashlib.sha256(data).hexdigest(), "size": len(data), "model": model}

    def save_conditionals(self, conditionals: Any, path: Path) -> None:
        Path(path).write_text(json.dumps(conditionals), encoding="utf-8")

    def load_conditionals(self, path: Path, model: str = ORIGINAL) -> Any:
        return json.loads(Path(path).read_text(encoding="utf-8"))

    def builtin_conditionals(self, model: str = ORIGINAL) -> dict[str, Any]:
        return {"digest": "fake-builtin", "size": 0, "model": model}

    # --- synthesis ------------------------------------------------------------------------------

    def count_text_tokens(self, text: str, model: str = ORIGINAL, language: str = "en") -> int:
        return len(text)

    def speech_tokens_for(self, text: str, max_speech_tokens: int) -> int:
        return max(1, min(max_speech_tokens, round(len(text) * TOKENS_PER_CHAR)))

    async def synthesize(self, job: SynthesisJob) -> AsyncIterator[AudioChunk]:
        _append_bounded(self.jobs, job)
        finished = False
        pieces = 0
        try:
            for text in job.chunks:
                total = self.speech_tokens_for(text, job.params.max_speech_tokens)
                pitches = self._pitches(job, text, total)
                counted = self._t3_counts.setdefault(job.model, T3Stats()).request()  # as a T3 request
                try:
                    for start in range(0, total, TOKENS_PER_PIECE):
                        if self.piece_delay_s:
                            await asyncio.sleep(self.piece_delay_s)
                        else:
                            await asyncio.sleep(0)  # a real engine yields to the loop too
                        if self.fail_after_pieces is not None and pieces >= self.fail_after_pieces:
                            raise EngineError("the fake engine failed as configured")
                        piece = pitches[start : start + TOKENS_PER_PIECE]
                        pieces += 1
                        counted.delivered(len(piece))
                        yield AudioChunk(samples=_tones(piece), speech_tokens=len(piece))
                finally:
                    counted.end()
            finished = True
        except EngineError:
            _append_bounded(self.failed, job.request_id)
            raise
        finally:
            if finished:
                _append_bounded(self.completed, job.request_id)
            elif job.request_id not in self.failed:
                _append_bounded(self.cancelled, job.request_id)

    def t3_stats(self) -> dict[str, T3Stats]:
        """Its chunks counted as a T3 engine's requests (waiting until their first piece, then
        decoding; a piece's tokens one delivery), so the metrics and the benchmark's T3 columns
        run against the fake too."""
        return {model: dataclasses.replace(counts) for model, counts in self._t3_counts.items()}

    def _pitches(self, job: SynthesisJob, text: str, count: int) -> np.ndarray:
        seed = DEFAULT_SEED if job.params.seed is None else job.params.seed
        material = f"{job.voice.key}\x00{text}\x00{seed}".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(material).digest()[:8], "little"))
        return rng.uniform(150.0, 600.0, size=count)


def _tones(pitches: np.ndarray) -> np.ndarray:
    """One 40 ms sine per pitch, faded in and out so tokens join without clicks."""
    t = np.arange(SAMPLES_PER_TOKEN, dtype=np.float64) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(np.arange(SAMPLES_PER_TOKEN), np.arange(SAMPLES_PER_TOKEN)[::-1]) / 48.0)
    tones = 0.3 * np.sin(2 * np.pi * pitches[:, None] * t[None, :]) * fade[None, :]
    return tones.reshape(-1).astype(np.float32)


HISTORY = 1000
"""Most recent jobs/ids the fake engine remembers: a long-running fake server stays bounded."""


def _append_bounded(items: list, item: object) -> None:
    items.append(item)
    if len(items) > HISTORY:
        del items[: len(items) - HISTORY]
