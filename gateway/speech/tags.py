"""Paralinguistic tags (``[laugh]``, ``[clear throat]``, ...): kept whole for the model that
knows them, removed for the others, so one app's text works on every model.

Turbo's tokenizer has each of its tags as one added token (:data:`TURBO_TAGS`); the tag must
reach it exactly as written. Text normalisation (capitalisation, punctuation rules) and
chunking (cuts at spaces: ``[clear throat]`` has one) would alter or split a tag, so
:func:`protect` first swaps each known tag for one private-use character, which
normalisation keeps and never cuts or capitalises, and :func:`restore` puts the tag back in
every chunk. For families without tags, :func:`remove_tags` drops the known tags (and the
space they leave) before anything else. Matching is case-insensitive (``[Laugh]`` is
``[laugh]``); bracketed words that are not tags stay text.
"""

from __future__ import annotations

import re

from gateway.models.families import TURBO_TAGS

_BASE = 0xE000  # Unicode private use area: never in real input we keep (see protect)
_TAG = re.compile("|".join(re.escape(tag) for tag in TURBO_TAGS), re.IGNORECASE)
_PLACEHOLDER = re.compile(f"[{chr(_BASE)}-{chr(_BASE + len(TURBO_TAGS) - 1)}]")
_INDEX = {tag: i for i, tag in enumerate(TURBO_TAGS)}
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.!?])")


def protect(text: str, tags: tuple[str, ...]) -> str:
    """``text`` with every tag of ``tags`` as one placeholder character (private-use
    characters already in the text are dropped: they would read as tags)."""
    text = _PLACEHOLDER.sub("", text)
    allowed = set(tags)

    def swap(match: re.Match[str]) -> str:
        tag = match.group(0).lower()
        return chr(_BASE + _INDEX[tag]) if tag in allowed else match.group(0)

    return _TAG.sub(swap, text)


def restore(text: str) -> str:
    """The tags back in place of their placeholders."""
    return _PLACEHOLDER.sub(lambda m: TURBO_TAGS[ord(m.group(0)) - _BASE], text)


def remove_tags(text: str) -> str:
    """``text`` without Turbo's tags (for the families that would read them out)."""
    stripped = _TAG.sub(" ", text)
    if stripped == text:
        return text
    return _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", stripped)).strip()


def count_tags(text: str) -> int:
    return len(_TAG.findall(text))
