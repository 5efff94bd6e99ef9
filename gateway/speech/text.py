"""Input text -> what the model reads: punctuation normalised, split into chunks it can say.

``normalize_text`` cleans what the Chatterbox tokenizer handles badly (control characters,
typographic punctuation it rarely saw in training) while keeping the meaning; it is
idempotent. ``split_text`` normalises, then cuts the text into chunks of at most
``max_chars``: at sentence ends first, then at clause boundaries, then between words, and
as a last resort inside an over-long "word". Every cut is at a single space of the
normalised text (or, for a hard cut, inside a word), so ``" ".join(chunks)`` is the
normalised text with at most extra spaces at hard cuts: nothing is lost or invented.

Nothing to say: text with no letters or digits (only punctuation, or emoji) is still sent
as-is as one chunk (the model makes a short non-verbal sound or pause; generation stays
bounded by ``max_speech_tokens``); text that is empty after normalisation (it held only
control characters, or only pauses such as ``...``) becomes the single chunk ``"."``. We never substitute invented words.
"""

from __future__ import annotations

import re
import unicodedata

# Characters we keep even though Unicode calls them "format" characters: the zero-width
# joiner/non-joiner change how emoji sequences and Persian/Indic words are written.
_KEEP_FORMAT = {"\u200c", "\u200d"}

_TRANSLATE = str.maketrans(
    {
        # Typographic quotes -> the straight ones the tokenizer knows.
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u2033": '"',
        "\u2039": "'", "\u203a": "'", "\u0060": "'", "\u00b4": "'",
        # Full-width punctuation (CJK input methods) -> ASCII.
        "\uff0c": ",", "\u3001": ",", "\u3002": ".", "\uff0e": ".", "\uff01": "!", "\uff1f": "?",
        "\uff1a": ":", "\uff1b": ";", "\uff08": "(", "\uff09": ")",
        # Hyphen look-alikes -> "-" (dashes are handled separately: they are pauses).
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2212": "-",
        "\u2026": "...",
    }
)

SENTENCE_ENDERS = ".!?\u061f\u06d4\u0964\u0965"  # . ! ? Arabic ? Urdu full stop, Devanagari danda
CLOSERS = "\"')]}"
# Every pattern that starts with a repeated class is anchored to the start of its run
# ("(?<!\s)\s+", "(?<!\.)\.{2,}+"): otherwise a failed match is retried from every position
# inside a long run, and 4,000 spaces or dots cost quadratic time.
# An ellipsis is a pause: a comma. Before a space, a closing quote or the end it needs no
# space of its own ('"wait…"' -> '"wait,"'); glued to the next word it gets one.
_ELLIPSIS_AT_BREAK = re.compile(r"(?<!\.)\.{2,}+(?=\s|$|[\"')\]}])")
_ELLIPSIS = re.compile(r"\.{2,}")
# A run of dashes used as punctuation (em/en dash, "--", a hyphen standing alone).
_DASH = re.compile(r"(?<!\s)(?:\s*(?:[\u2013\u2014\u2015]|--+|(?<!\S)-(?!\S)))+\s*")
_DIGIT_RANGE_DASH = re.compile(r"(?<=\d)[\u2013\u2014](?=\d)")
_DIGIT_COLON = re.compile(r"(?<=\d):(?=\d)")
_CLAUSE_MARKS = re.compile(r"[;:]")
_SPACE_BEFORE_PUNCT = re.compile(r"(?<!\s)\s+([,.!?\u060c\u061f])")
_REPEATED_PUNCT = re.compile(r"([,.!?])\1+")  # ellipses are gone by now: ".." is a typo
_COMMA_AFTER_PUNCT = re.compile(r"(?<=[.!?\u061f]),|,(?=[.!?\u061f])|(?<=[,.!?][\"')\]]),")
_COMMA_GLUED_TO_WORD = re.compile(r",(?=[^\W\d_])")  # "a,b" -> "a, b" (but "1,000" stays)
_WHITESPACE = re.compile(r"\s+")

# Words ending in "." that rarely end a sentence (lower case, without the dot).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no approx dept est fig inc ltd co jan feb mar apr "
    "jun jul aug sep sept oct nov dec mt ft".split()
)


def _strip_controls(text: str) -> str:
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch.isspace() or cat in ("Zl", "Zp"):
            out.append(" ")  # newlines, tabs, exotic spaces: a word break
        elif cat in ("Cc", "Cs") or (cat == "Cf" and ch not in _KEEP_FORMAT):
            continue  # NUL, escape codes, lone surrogates, bidi marks, BOM, soft hyphen
        else:
            out.append(ch)
    return "".join(out)


def _capitalise_first(text: str) -> str:
    # The first letter, even behind an opening quote or bracket; never inside a word that
    # starts with a digit ("3d" stays).
    for i, ch in enumerate(text):
        if ch.isalnum():
            return text[:i] + ch.upper() + text[i + 1 :] if ch.islower() else text
    return text


def _ensure_sentence_end(text: str) -> str:
    body = text.rstrip(CLOSERS)
    tail = text[len(body) :]
    if not any(ch.isalnum() for ch in body):
        return text  # only punctuation/emoji: a "." would add nothing to say
    # A trailing comma/colon/dash is an unfinished pause: the sentence end replaces it.
    body = body.rstrip(",;:-\u060c ")
    if body[-1] in SENTENCE_ENDERS:
        return body + tail
    return body + tail + "."


def normalize_text(text: str) -> str:
    """Clean input text for the model: controls out, rare punctuation mapped, one final stop.

    - control and invisible format characters removed; newlines and tabs become spaces;
    - typographic quotes, full-width punctuation and hyphen look-alikes become ASCII;
    - ``…``/``...`` become a comma pause; dashes and `` - `` become a comma pause, except
      a dash between digits (a range: ``1990–2000``) which becomes ``-``;
    - ``;`` and ``:`` become commas, except ``:`` between digits (``10:30`` -> ``10 30``);
    - spaces before punctuation and repeated ``,.!?`` collapsed; whitespace collapsed;
    - first letter capitalised; a final ``.`` added when the text has no sentence end
      (a trailing comma/colon/dash becomes the ``.``).
    Idempotent: normalising twice gives the same text (each rule's output can expose
    work for another, e.g. a control character between two dashes, so the rules are
    applied until nothing changes; that takes one or two rounds in practice).
    """
    for _ in range(8):
        cleaned = _normalize_once(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _normalize_once(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _strip_controls(text).translate(_TRANSLATE)
    text = _ELLIPSIS_AT_BREAK.sub(",", text)
    text = _ELLIPSIS.sub(", ", text)
    text = _DIGIT_COLON.sub(" ", text)
    text = _CLAUSE_MARKS.sub(", ", text)
    text = _DIGIT_RANGE_DASH.sub("-", text)
    text = _DASH.sub(", ", text)
    text = _WHITESPACE.sub(" ", text).strip()
    # Each of these can expose work for another ("a , . ," -> "a.,"): repeat to a fixed point.
    previous = None
    while text != previous:
        previous = text
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
        text = _REPEATED_PUNCT.sub(r"\1", text)
        text = _COMMA_AFTER_PUNCT.sub("", text)
    text = _COMMA_GLUED_TO_WORD.sub(", ", text)
    text = text.lstrip(", ")
    if not text:
        return ""
    return _ensure_sentence_end(_capitalise_first(text))


# ---- splitting ---------------------------------------------------------------------------


def _sentence_pieces(text: str) -> list[str]:
    """Split at the space after a sentence end (". ", '?" ', "! "), skipping abbreviations."""
    pieces: list[str] = []
    start = 0
    for match in re.finditer(rf"[{SENTENCE_ENDERS}][{re.escape(CLOSERS)}]* ", text):
        # the word before the mark, found without copying everything since ``start``
        last_word = text[max(start, text.rfind(" ", start, match.start()) + 1) : match.start() + 1]
        if match.group(0)[0] == "." and is_abbreviation(last_word):
            continue
        pieces.append(text[start : match.end() - 1])
        start = match.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]


def is_abbreviation(word: str) -> bool:
    core = word.lstrip("\"'([").rstrip(".").lower()
    # A single capital before "." is an initial ("J. R. R. Tolkien").
    return core in _ABBREVIATIONS or (len(core) == 1 and core.isalpha() and word.lstrip("\"'([")[0].isupper())


def _clause_pieces(text: str) -> list[str]:
    pieces = re.split(r"(?<=[,)\u060c]) ", text)
    return [p for p in pieces if p]


def _word_pieces(text: str) -> list[str]:
    return [p for p in text.split(" ") if p]


def hard_cut(word: str, max_chars: int) -> list[str]:
    """Cut a space-less run into pieces of <= max_chars, never inside a combining sequence
    (accents, emoji modifiers, ZWJ emoji) when a nearby cut avoids it."""
    out: list[str] = []
    start = 0
    while len(word) - start > max_chars:
        cut = max_chars
        while cut > 1 and _joins_previous(word, start + cut):
            cut -= 1
        if cut == 1 and _joins_previous(word, start + cut):
            cut = max_chars  # one cluster longer than max_chars: cutting it is unavoidable
        out.append(word[start : start + cut])
        start += cut
    if start < len(word):
        out.append(word[start:])
    return out


def _joins_previous(text: str, i: int) -> bool:
    ch, prev = text[i], text[i - 1]
    return (
        unicodedata.combining(ch) != 0
        or unicodedata.category(ch) in ("Mn", "Mc", "Me", "Sk")
        or ch in "\u200d\ufe0e\ufe0f"
        or prev == "\u200d"
        or 0x1F3FB <= ord(ch) <= 0x1F3FF  # skin-tone modifiers
        or 0xE0020 <= ord(ch) <= 0xE007F  # emoji tag sequences (flags of regions)
    )


_LEVELS = (_sentence_pieces, _clause_pieces, _word_pieces)


def _fit(segment: str, max_chars: int, level: int) -> list[str]:
    if len(segment) <= max_chars:
        return [segment]
    if level == len(_LEVELS):
        return hard_cut(segment, max_chars)
    pieces = _LEVELS[level](segment)
    if len(pieces) <= 1:
        return _fit(segment, max_chars, level + 1)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if len(piece) > max_chars:
            if current:
                chunks.append(current)
                current = ""
            chunks.extend(_fit(piece, max_chars, level + 1))
        elif not current:
            current = piece
        elif len(current) + 1 + len(piece) <= max_chars:
            current = f"{current} {piece}"
        else:
            chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def split_text(text: str, max_chars: int) -> list[str]:
    """Normalise ``text`` and split it into non-empty chunks of at most ``max_chars`` each.

    Sentences are packed greedily (a chunk holds as many whole sentences as fit); a sentence
    longer than ``max_chars`` is split at clauses, then words, then inside a word. Always at
    least one chunk (see the module docstring for text with nothing to say).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    normalized = normalize_text(text)
    if not normalized:
        return ["."]
    return _fit(normalized, max_chars, 0)
