"""Text that arrives in pieces (an LLM's tokens) -> chunks to speak, each cut as soon as it is wise.

A voice agent streams its text in; speech should start as soon as there is enough to say well,
and each chunk should end where a speaker would pause. :class:`TextStream` buffers the pieces
and cuts chunks off the front of the buffer:

- **schedule** (ElevenLabs' ``chunk_length_schedule``, default ``[120, 160, 250, 290]``): the
  k-th chunk since the last flush is cut once the buffer holds ``schedule[k]`` characters (the
  last value repeats), at the best boundary between half that length and a quarter more: the
  last sentence end, else the last clause mark (``,;:`` and dashes), else the last space
  between words (none there: the first boundary past it, else the last one before half).
- **auto mode**: the schedule is off; complete sentences are cut at once (the client sends
  sentences or phrases), several together only while they fit in the schedule's last value.
  A buffer that reaches that value without a sentence end is cut as in schedule mode, so a
  run-on list still starts speaking.
- **flush**: everything buffered, now; the schedule starts again (the next turn's first chunk
  is short again).
- **try_trigger**: cut now, at the best boundary, when at least :data:`MIN_TRIGGER_CHARS` are
  buffered (ElevenLabs' ``try_trigger_generation``); otherwise wait.

A boundary counts only once what follows it has arrived: ``"Hello wor"`` may still become
``"Hello world"``, so a chunk ends only after whitespace (or, in auto mode, at a sentence end
that closes the piece received). Text with no whitespace at all (a URL, CJK without
full-width stops) is cut hard at ``max_chars``, never inside a combining sequence
(:func:`gateway.speech.text.hard_cut`).

Chunks keep the text exactly as it arrived, whitespace included (a chunk ends after the
whitespace that follows its boundary), so the chunks joined are the input: character timings
are reported on exactly the characters the client sent. A chunk of whitespace only is
dropped. Nothing here is normalised: each chunk goes through the same front end as a whole
request (:func:`gateway.speech.service.speech_chunks`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from gateway.speech.text import CLOSERS, SENTENCE_ENDERS, hard_cut, is_abbreviation

DEFAULT_SCHEDULE = (120, 160, 250, 290)
"""ElevenLabs' default ``chunk_length_schedule`` (characters)."""
MIN_TRIGGER_CHARS = 50
"""``try_trigger_generation`` cuts only a buffer at least this long (ElevenLabs' smallest
schedule value): shorter text is not worth a chunk of its own."""
DEFAULT_MAX_CHARS = 500
"""A buffer this long with no boundary is cut hard (ElevenLabs' largest schedule value)."""

# Ranks of a boundary: a chunk ends at the best rank available, the latest one of that rank.
_SENTENCE, _CLAUSE, _WORD = 3, 2, 1

_CLOSE = re.escape(CLOSERS + "\u201d\u2019\u00bb\u300d\u300f\uff09")  # typographic and CJK closers too
_ENDERS = re.escape(SENTENCE_ENDERS + "\u2026")  # ... and the ellipsis character
# "end. " / 'end!" ' / "end... ": a sentence end with the whitespace after it
_SENTENCE_END = re.compile(rf"[{_ENDERS}]+[{_CLOSE}]*\s+")
# full-width stops end a sentence whatever follows (CJK text has no spaces)
_FULL_WIDTH_END = re.compile(rf"[\u3002\uff01\uff1f]+[{_CLOSE}]*\s*")
# auto mode: a sentence end that closes the buffer
_SENTENCE_AT_END = re.compile(rf"[{_ENDERS}]+[{_CLOSE}]*$")
_CLAUSE_END = re.compile(rf"(?:[,;:\u2013\u2014\u060c\u3001\uff0c\uff1b\uff1a]+[{_CLOSE}]*|\s-+)\s+")
_SPACE = re.compile(r"\s+")
_WORD_BEFORE = re.compile(r"\S+$")


class TextStream:
    """One context's text buffer. Not thread-safe; one per speech context."""

    def __init__(
        self,
        schedule: Sequence[int] = DEFAULT_SCHEDULE,
        *,
        auto_mode: bool = False,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if not schedule or min(schedule) < 1:
            raise ValueError(f"schedule must hold positive lengths, got {list(schedule)}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        self.schedule = tuple(schedule)
        self.auto_mode = auto_mode
        self.max_chars = max_chars
        self._buffer = ""
        self._cut_since_flush = 0

    @property
    def buffered(self) -> int:
        """Characters received and not yet cut into a chunk."""
        return len(self._buffer)

    def push(self, text: str) -> list[str]:
        """Add ``text``; the chunks that are now ready, in order (often none)."""
        self._buffer += text
        chunks: list[str] = []
        while (index := self._ready_cut()) is not None:
            chunks.extend(self._take(index))
        return chunks

    def trigger(self) -> list[str]:
        """``try_trigger_generation``: a chunk now if enough is buffered and a boundary exists."""
        if len(self._buffer) < MIN_TRIGGER_CHARS:
            return []
        index = self._best_cut(len(self._buffer))
        return self._take(index) if index is not None else []

    def flush(self) -> list[str]:
        """Everything buffered, as one chunk (none if only whitespace); the schedule restarts."""
        chunks = self._take(len(self._buffer))
        self._cut_since_flush = 0
        return chunks

    # --- where to cut ------------------------------------------------------------------------

    def _threshold(self) -> int:
        if self.auto_mode:
            return self.schedule[-1]
        return self.schedule[min(self._cut_since_flush, len(self.schedule) - 1)]

    def _ready_cut(self) -> int | None:
        if not self._buffer:
            return None
        threshold = self._threshold()
        if self.auto_mode:
            ends = [index for rank, index in self._boundaries() if rank == _SENTENCE]
            if ends:  # the complete sentences, grouped up to the schedule's last value
                within = [index for index in ends if index <= threshold]
                return within[-1] if within else ends[0]
        if len(self._buffer) >= threshold:
            index = self._best_cut(threshold)
            if index is not None:
                return index
        if len(self._buffer) >= self.max_chars:
            return -1  # no boundary at all: a hard cut
        return None

    def _best_cut(self, threshold: int) -> int | None:
        """Where to end a chunk of about ``threshold`` characters: the best boundary between half
        of it and a quarter more (the latest of the best rank: a sentence end just past the
        threshold beats a space before it); else the first one past that; else the last one
        before half of it; None when the buffer has no boundary."""
        floor, ceiling = threshold // 2, threshold + threshold // 4
        best: tuple[int, int] | None = None
        last_before: int | None = None
        for rank, index in self._boundaries():
            if index < floor:
                last_before = index
            elif index <= ceiling:
                if best is None or rank >= best[0]:
                    best = (rank, index)
            else:
                return best[1] if best is not None else index
        return best[1] if best is not None else last_before

    def _boundaries(self) -> Iterator[tuple[int, int]]:
        """(rank, end) of every complete boundary in the buffer, in order of ``end`` (several
        ranks may end at the same place; the highest is given last)."""
        text = self._buffer
        found: dict[int, int] = {}
        for match in _SPACE.finditer(text):
            found[match.end()] = _WORD
        for match in _CLAUSE_END.finditer(text):
            found[match.end()] = max(found.get(match.end(), 0), _CLAUSE)
        for match in _SENTENCE_END.finditer(text):
            rank = _WORD if self._after_abbreviation(match.start()) else _SENTENCE
            found[match.end()] = max(found.get(match.end(), 0), rank)
        for match in _FULL_WIDTH_END.finditer(text):
            found[match.end()] = _SENTENCE
        if self.auto_mode and (match := _SENTENCE_AT_END.search(text)) and not self._after_abbreviation(match.start()):
            found[len(text)] = _SENTENCE
        for end in sorted(found):
            if end > 0:
                yield found[end], end

    def _after_abbreviation(self, mark: int) -> bool:
        """Whether the "." at ``mark`` ends an abbreviation or an initial ("Dr.", "J.")."""
        if self._buffer[mark] != ".":
            return False
        word = _WORD_BEFORE.search(self._buffer, 0, mark + 1)
        return word is not None and is_abbreviation(word.group(0))

    def _take(self, index: int) -> list[str]:
        """Cut ``buffer[:index]`` off (``-1``: a hard cut at ``max_chars``) as chunks."""
        if index == -1:
            piece = hard_cut(self._buffer, self.max_chars)[0]
            index = len(piece)
        chunk, self._buffer = self._buffer[:index], self._buffer[index:]
        if not chunk.strip():
            return []
        self._cut_since_flush += 1
        return [chunk]
