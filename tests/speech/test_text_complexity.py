"""Text processing is linear in the input: the same pathological pattern at 8x the size costs
about 8x, not 64x (compared in one run, best of several, so machine speed and load cancel
out). Each pattern here was quadratic once (runs of spaces, dots, tabs before a letter)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from gateway.speech.text import split_text

SMALL, LARGE = 512, 4096
LINEAR_BOUND = 20.0
"""Linear work gives a ratio near 8; quadratic near 64."""

PATTERNS: dict[str, Callable[[int], str]] = {
    "spaces then a letter": lambda n: " " * (n - 1) + "a",
    "dots then a letter": lambda n: "." * (n - 1) + "a",
    "tabs and newlines": lambda n: "\t\n" * (n // 2) + "a",
    "spaces then a dash": lambda n: "a" + " " * (n - 2) + "-",
    "space dash pairs": lambda n: " -" * (n // 2) + "a",
    "em dashes": lambda n: "\u2014 " * (n // 2) + "a",
    "comma space": lambda n: ", " * (n // 2),
    "abbreviations": lambda n: "Mr. " * (n // 4),
    "ellipses glued to words": lambda n: "a..." * (n // 4),
    "commas": lambda n: "," * n + "a",
    "one long word": lambda n: "a" * n,
    "colons": lambda n: ": " * (n // 2) + "a",
    "space before punctuation": lambda n: "a" + " " * (n - 3) + ".,",
}


def cost(text: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        split_text(text, 300)
        best = min(best, time.process_time() - started)
    return max(best, 1e-6)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_text_processing_grows_linearly(name: str) -> None:
    make = PATTERNS[name]
    small, large = make(SMALL), make(LARGE)
    ratio = cost(large, 5) / cost(small, 40)
    assert ratio < LINEAR_BOUND, f"{name}: {LARGE // SMALL}x the input cost {ratio:.0f}x the time"
