"""normalize_text and split_text: examples for each rule, then seeded random properties."""

from __future__ import annotations

import random
import unicodedata

import pytest

from gateway.speech.text import normalize_text, split_text

FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"  # one grapheme, 7 code points


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("hello world", "Hello world."),
        ("  hello\n\n\tworld  ", "Hello world."),
        ("he\x00llo\x1b wor\u200bld\ufeff", "Hello world."),
        ("\u201cSmart\u201d \u2018quotes\u2019", "\"Smart\" 'quotes'."),
        ("Wait\u2026 what?", "Wait, what?"),
        ("Wait...what", "Wait, what."),
        ("I don't know...", "I don't know."),
        ("one \u2014 two \u2013 three - four", "One, two, three, four."),
        ("well-known fact", "Well-known fact."),
        ("from 1990\u20132000", "From 1990-2000."),
        ("Note: at 10:30; sharp", "Note, at 10 30, sharp."),
        ("Hello ,world ,,", "Hello, world."),
        ("1,000 people", "1,000 people."),
        ("Really!!! Yes??", "Really! Yes?"),
        ("\"quoted\"", "\"Quoted\"."),
        ("ends with comma,", "Ends with comma."),
        ("3d printing", "3d printing."),
        ("\uff08\u4f60\u597d\uff09\u3002", "(\u4f60\u597d)."),
        ("\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u061f", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u061f"),
        ("12345", "12345."),
        ("?!...", "?!"),
        ("\U0001F600\U0001F600", "\U0001F600\U0001F600"),
        (FAMILY, FAMILY),
        ("...", ""),
        ("\x00\x01\x02", ""),
        ("", ""),
    ],
)
def test_normalize_examples(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_sentences_first() -> None:
    text = "Mr. Smith went to Washington. He said hi! Then, after a long pause, nothing at all happened to anyone there."
    assert split_text(text, 40) == [
        "Mr. Smith went to Washington.",
        "He said hi!",
        "Then, after a long pause,",
        "nothing at all happened to anyone there.",
    ]


def test_sentences_are_packed_up_to_the_limit() -> None:
    assert split_text("One. Two. Three. Four.", 10) == ["One. Two.", "Three.", "Four."]
    assert split_text("One. Two. Three. Four.", 300) == ["One. Two. Three. Four."]


def test_abbreviations_and_initials_do_not_end_sentences() -> None:
    # 38 chars: too long, so it is split, but at the clause, not after "Dr.", "J.", "R." or "e.g."
    chunks = split_text("Dr. J. R. Smith arrived, e.g. at noon. He left.", 36)
    assert chunks == ["Dr. J. R. Smith arrived,", "e.g. at noon.", "He left."]
    assert split_text("Dr. Who is here. Yes.", 17) == ["Dr. Who is here.", "Yes."]


def test_words_when_no_clause_fits() -> None:
    assert split_text("alpha beta gamma delta epsilon", 12) == ["Alpha beta", "gamma delta", "epsilon."]


def test_one_4096_char_word_is_hard_cut() -> None:
    chunks = split_text("x" * 4096, 300)
    assert all(0 < len(c) <= 300 for c in chunks)
    assert "".join(chunks) == "X" + "x" * 4095 + "."


def test_hard_cut_keeps_emoji_clusters_whole() -> None:
    chunks = split_text(FAMILY * 10, 15)
    assert chunks == [FAMILY * 2] * 5


def test_hard_cut_keeps_combining_accents_with_their_letter() -> None:
    word = "q\u0301" * 20  # no precomposed form: NFC keeps the mark as its own code point
    chunks = split_text(word, 5)
    assert all(not unicodedata.combining(c[0]) for c in chunks)
    assert "".join(chunks) == normalize_text(word)


def test_rtl_sentences_split_at_arabic_question_mark() -> None:
    text = "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u061f \u0643\u064a\u0641 \u062d\u0627\u0644\u0643"
    assert split_text(text, 15) == ["\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u061f", "\u0643\u064a\u0641 \u062d\u0627\u0644\u0643."]


@pytest.mark.parametrize("text", ["?!", "...", "!!!???", "\x00", "\u200b", "\U0001F600", "42"])
def test_nothing_to_say_still_gives_one_speakable_chunk(text: str) -> None:
    chunks = split_text(text, 300)
    assert len(chunks) == 1 and chunks[0].strip()
    assert chunks == [normalize_text(text) or "."]


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        split_text("hi", 0)


# ---- properties over random text ---------------------------------------------------------

ATOMS = [
    "hello", "world", "Dr.", "e.g.", "1,000", "10:30", "3.14", "x" * 50, "\U0001F600", FAMILY,
    "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd", "\u4f60\u597d", "caf\u00e9", "q\u0301",
    ".", ",", "!", "?", "...", "\u2026", ";", ":", "\u2014", "-", "\u201c", "\u201d", "'", "(", ")",
    " ", "  ", "\n", "\t", "\x00", "\x07", "\u200b", "\u200f", "\ufeff", "<speak>", "</speak>", "&amp;",
]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ATOMS) + rng.choice(["", " ", " "]) for _ in range(rng.randint(0, 60)))


def squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("seed", range(1000))
def test_split_properties(seed: int) -> None:
    rng = random.Random(seed)
    text = random_text(rng)
    max_chars = rng.choice([1, 2, 5, 20, 37, 100, 300])
    normalized = normalize_text(text)

    assert normalize_text(normalized) == normalized  # idempotent
    assert normalized == normalized.strip() and "  " not in normalized
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in normalized)

    chunks = split_text(text, max_chars)
    assert chunks, "never an empty job"
    assert all(c and c == c.strip() and len(c) <= max_chars for c in chunks)
    if not normalized:
        assert chunks == ["."]
        return
    assert squash("".join(chunks)) == squash(normalized)  # nothing lost, nothing added
    if all(len(w) <= max_chars for w in normalized.split(" ")):
        assert " ".join(chunks) == normalized  # no hard cut: exact up to the joining spaces
