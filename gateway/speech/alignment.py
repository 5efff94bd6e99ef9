"""Where each character of a spoken chunk falls in its audio.

Two kinds of time, kept apart on purpose:

- **exact**: where each text chunk's audio starts and ends in the utterance. The server counts
  the samples the engine made for the chunk (:mod:`gateway.speech.utterance`), so these are
  sample-accurate (divided by the tempo when ``speed`` is not 1).
- **estimated**: where each character falls *within* its chunk. Chatterbox has no duration
  model and exposes no alignment of its own (upstream's attention-based analyser was removed),
  and the forced aligners that could tell (MMS, wav2vec2 CTC) need weights this server does not
  ship. :class:`ProportionalAligner` spreads the chunk's voiced span over its characters by a
  weight per character class (letters and digits speak, spaces are short, commas and
  sentence ends are pauses, quotes and brackets take no time). Word times from it are good to
  a few hundred milliseconds on ordinary prose: enough to cut a transcript where a listener
  interrupted, not enough for lip sync.

A real aligner replaces the estimate by implementing :class:`Aligner` (it receives the chunk's
text and its samples) and nothing else changes: the same timings serve ElevenLabs'
``with-timestamps`` routes and the WebSocket ``alignment``/``normalizedAlignment``.

The timings of a chunk always tile it the way ElevenLabs' clients add them up: the first
character starts where the voice starts (the leading silence is before it), every character
ends where the next starts, and the last one ends exactly at the chunk's end, so a client that
sums per-chunk times (Pipecat) stays on the exact chunk boundaries.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Relative speaking time per character class (a letter is 1).
_LETTER = 1.0
_DIGIT = 1.6  # "1990" is said as more sounds than it has characters
_SPACE = 0.35
_CLAUSE_PAUSE = 2.5
_SENTENCE_PAUSE = 4.0
_SILENT = 0.0  # quotes, brackets, symbols that are not said
_CLAUSE_MARKS = frozenset(",;:\u2013\u2014\u060c\u3001\uff0c\uff1b\uff1a")
_SENTENCE_MARKS = frozenset(".!?\u2026\u061f\u06d4\u0964\u0965\u3002\uff01\uff1f")

# Voiced span: frames whose RMS is within this many dB of the loudest frame are speech.
_FRAME_S = 0.01
_VOICED_BELOW_PEAK_DB = 40.0


@dataclass(frozen=True, slots=True)
class CharTimings:
    """Per-character times in seconds, relative to the start of the chunk's audio."""

    chars: tuple[str, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.chars) == len(self.starts) == len(self.ends):
            raise ValueError("chars, starts and ends must have the same length")

    def shifted(self, offset_s: float) -> CharTimings:
        """The same timings ``offset_s`` later (relative to the utterance instead of the chunk)."""
        return CharTimings(self.chars, tuple(t + offset_s for t in self.starts), tuple(t + offset_s for t in self.ends))


class Aligner(Protocol):
    """Character times of one chunk of speech. Called off the event loop (a worker thread)."""

    def align(self, text: str, samples: np.ndarray, sample_rate: int, *, duration_s: float) -> CharTimings:
        """Times for every character of ``text`` (as given, whitespace included) in
        ``[0, duration_s]``: ``samples`` is the chunk's audio at ``sample_rate`` before any
        tempo change, ``duration_s`` its length as played (after the tempo change)."""
        ...


class ProportionalAligner:
    """The estimate of the module docstring: no model, microseconds per chunk."""

    def align(self, text: str, samples: np.ndarray, sample_rate: int, *, duration_s: float) -> CharTimings:
        chars = tuple(text)
        if not chars:
            return CharTimings((), (), ())
        scale = duration_s / (len(samples) / sample_rate) if len(samples) else 0.0
        voiced_start, voiced_end = (t * scale for t in voiced_span(samples, sample_rate))
        weights = np.array([char_weight(c) for c in chars], dtype=np.float64)
        # leading and trailing whitespace is not said: it sits in the silences
        spoken = [i for i, c in enumerate(chars) if not c.isspace()]
        if spoken:
            weights[: spoken[0]] = 0.0
            weights[spoken[-1] + 1 :] = 0.0
        total = float(weights.sum())
        if total <= 0.0:  # nothing weighs anything (only quotes, say): share the span equally
            weights = np.ones(len(chars))
            total = float(len(chars))
        bounds = voiced_start + (voiced_end - voiced_start) * np.concatenate(([0.0], np.cumsum(weights) / total))
        starts = bounds[:-1].copy()
        ends = bounds[1:].copy()
        ends[-1] = duration_s  # the last character runs to the chunk's exact end
        return CharTimings(chars, tuple(float(t) for t in starts), tuple(float(t) for t in ends))


def char_weight(char: str) -> float:
    if char.isspace():
        return _SPACE
    if char in _SENTENCE_MARKS:
        return _SENTENCE_PAUSE
    if char in _CLAUSE_MARKS:
        return _CLAUSE_PAUSE
    if char.isdigit():
        return _DIGIT
    if char.isalpha() or unicodedata.category(char).startswith("M"):
        return _LETTER
    return _SILENT


def voiced_span(samples: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """Start and end (seconds) of the part of ``samples`` louder than the silence around it:
    from the first to the last 10 ms frame within 40 dB of the loudest. The whole clip when it
    is silent throughout or shorter than a frame."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    duration = len(x) / sample_rate if sample_rate else 0.0
    frame = max(1, int(sample_rate * _FRAME_S))
    frames = len(x) // frame
    if frames == 0:
        return 0.0, duration
    rms = np.sqrt(np.mean(np.square(x[: frames * frame].reshape(frames, frame), dtype=np.float64), axis=1))
    peak = float(rms.max())
    if peak <= 0.0 or not np.isfinite(peak):
        return 0.0, duration
    loud = np.flatnonzero(rms >= peak * 10 ** (-_VOICED_BELOW_PEAK_DB / 20))
    return float(loud[0] * frame / sample_rate), min(duration, float((loud[-1] + 1) * frame / sample_rate))
