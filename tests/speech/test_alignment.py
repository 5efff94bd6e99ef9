"""Character timings within a chunk: an estimate, but always well formed: every character
present, in order, inside the chunk, tiling it from where the voice starts to the chunk's exact
end (what clients that add chunk spans rely on)."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.speech.alignment import CharTimings, ProportionalAligner, char_weight, voiced_span

RATE = 24_000


def tone(seconds: float, *, lead_s: float = 0.0, tail_s: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    voiced = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.concatenate([np.zeros(int(lead_s * RATE), np.float32), voiced, np.zeros(int(tail_s * RATE), np.float32)])


@pytest.mark.parametrize(
    "text", ["Hello there, world.", " Leading and trailing spaces. ", "1990-2000!", "Ünïcödé café, naïve.", "\"Quoted.\"", "..."]
)
def test_timings_tile_the_chunk_from_the_voice_to_its_exact_end(text: str) -> None:
    samples = tone(1.2, lead_s=0.2, tail_s=0.3)
    duration = len(samples) / RATE
    timings = ProportionalAligner().align(text, samples, RATE, duration_s=duration)
    assert timings.chars == tuple(text)
    assert all(0.0 <= s <= e <= duration + 1e-9 for s, e in zip(timings.starts, timings.ends))
    assert all(a <= b + 1e-12 for a, b in zip(timings.starts, timings.starts[1:]))
    assert all(abs(e - s2) < 1e-9 for e, s2 in zip(timings.ends, timings.starts[1:]))  # contiguous
    assert timings.ends[-1] == pytest.approx(duration)
    first_spoken = next(i for i, c in enumerate(text) if not c.isspace())
    assert timings.starts[first_spoken] == pytest.approx(0.2, abs=0.011)  # where the voice starts


def test_pauses_weigh_more_than_letters_and_quotes_nothing() -> None:
    assert char_weight(".") > char_weight(",") > char_weight("a") > char_weight(" ") > char_weight('"') == 0.0
    timings = ProportionalAligner().align("ab. cd", tone(1.0), RATE, duration_s=1.0)
    durations = [e - s for s, e in zip(timings.starts, timings.ends)]
    assert durations[2] > durations[0] > durations[3]  # "." > "a" > " "


def test_tempo_scales_the_times_to_the_audio_as_played() -> None:
    samples = tone(2.0)
    timings = ProportionalAligner().align("Slow it down.", samples, RATE, duration_s=4.0)  # speed 0.5
    assert timings.ends[-1] == pytest.approx(4.0)
    assert timings.starts[0] == pytest.approx(0.0)


def test_empty_and_silent_chunks() -> None:
    aligner = ProportionalAligner()
    assert aligner.align("", tone(1.0), RATE, duration_s=1.0) == CharTimings((), (), ())
    silent = aligner.align("Hi.", np.zeros(RATE, np.float32), RATE, duration_s=1.0)
    assert silent.starts[0] == 0.0 and silent.ends[-1] == pytest.approx(1.0)
    assert voiced_span(np.zeros(10, np.float32), RATE) == (0.0, 10 / RATE)


def test_shifted_moves_every_time() -> None:
    timings = CharTimings(("a", "b"), (0.0, 0.5), (0.5, 1.0)).shifted(2.0)
    assert timings.starts == (2.0, 2.5) and timings.ends == (2.5, 3.0)
    with pytest.raises(ValueError):
        CharTimings(("a",), (), ())
