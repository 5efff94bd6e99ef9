"""The streaming chunker: text arriving in pieces is cut where a speaker would pause, as soon as
the schedule (or auto mode, or a flush) says, never inside a word that may still grow, and the
chunks joined are exactly the text received."""

from __future__ import annotations

import pytest

from gateway.speech.text_stream import MIN_TRIGGER_CHARS, TextStream

PARAGRAPH = (
    "Hello there, this is a test of the streaming chunker. It should cut at sentence ends when it can, "
    "and at commas otherwise; failing that, between words. Dr. Smith agrees with Mr. Jones on this point! "
    "Does it? It does."
)


def feed(stream: TextStream, text: str, piece: int = 3) -> list[str]:
    """``text`` in ``piece``-character slices (an LLM's tokens), then a flush."""
    chunks: list[str] = []
    for i in range(0, len(text), piece):
        chunks += stream.push(text[i : i + piece])
    return chunks + stream.flush()


@pytest.mark.parametrize("piece", [1, 3, 7, 40, 1000])
@pytest.mark.parametrize("auto_mode", [False, True])
def test_the_chunks_joined_are_the_input(piece: int, auto_mode: bool) -> None:
    chunks = feed(TextStream((50, 80), auto_mode=auto_mode), PARAGRAPH, piece)
    assert "".join(chunks) == PARAGRAPH
    assert all(chunk.strip() for chunk in chunks)


def test_cuts_prefer_sentence_ends_then_clauses_past_half_the_threshold() -> None:
    stream = TextStream((50, 80))
    chunks = stream.push(PARAGRAPH)
    # the first chunk at 50: the sentence end (past 25) wins over the comma before it
    assert chunks[0] == "Hello there, this is a test of the streaming chunker. "
    for chunk in chunks:
        assert chunk.rstrip()[-1] in ".!?,;"  # every cut at a sentence end or a clause
    assert stream.flush()[-1].endswith("It does.")  # the flush: the rest, as it is


def test_a_cut_happens_the_moment_the_threshold_is_reached() -> None:
    chunks = feed(TextStream((50, 80)), PARAGRAPH, 1)
    # one character at a time: at 50 characters the best boundary is the last space
    assert chunks[0] == "Hello there, this is a test of the streaming "
    assert 25 <= len(chunks[0]) <= 51


def test_no_chunk_before_the_threshold_and_never_inside_a_word() -> None:
    stream = TextStream((50,))
    assert stream.push("Short text without any") == []
    # 52 characters: cut at the last complete boundary; "wor" may still grow, so it stays
    assert stream.push(" end yet and still growing wor") == ["Short text without any end yet and still growing "]
    assert stream.push("d") == []
    assert stream.flush() == ["word"]


def test_auto_mode_cuts_every_complete_sentence_at_once() -> None:
    stream = TextStream(auto_mode=True)
    assert stream.push("Hello there.") == ["Hello there."]  # a sentence end closing the piece counts
    assert stream.push(" How are") == []
    assert stream.push(" you? I am") == [" How are you? "]
    assert stream.push(" fine") == []
    assert stream.flush() == ["I am fine"]


def test_auto_mode_still_cuts_a_long_run_without_sentence_ends() -> None:
    stream = TextStream((50, 100), auto_mode=True)
    text = "one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen " * 2
    chunks = [c for i in range(0, len(text), 5) for c in stream.push(text[i : i + 5])]
    assert chunks and chunks[0].endswith(", ")
    assert len(chunks[0]) <= 100


def test_abbreviations_and_initials_are_not_sentence_ends() -> None:
    stream = TextStream(auto_mode=True)
    assert stream.push("Dr. Smith met J. R. Tolkien") == []
    assert stream.push(" at noon. Then") == ["Dr. Smith met J. R. Tolkien at noon. "]


def test_flush_restarts_the_schedule() -> None:
    stream = TextStream((50, 300))
    first = stream.push("A first turn that is long enough to be cut by the schedule here. ")
    assert first
    stream.flush()
    assert stream.push("x " * 30)  # 60 chars: the schedule is back at 50, not at 300


def test_try_trigger_cuts_only_enough_text() -> None:
    stream = TextStream((500,))
    stream.push("Too short to trigger. ")
    assert stream.trigger() == []
    stream.push("But now there is enough text to make a chunk of it, surely. ")
    assert stream.buffered >= MIN_TRIGGER_CHARS
    assert stream.trigger() == ["Too short to trigger. But now there is enough text to make a chunk of it, surely. "]


def test_text_without_any_whitespace_is_cut_hard_at_max_chars() -> None:
    stream = TextStream((50,), max_chars=100)
    chunks = stream.push("x" * 250)
    assert [len(c) for c in chunks] == [100, 100]
    assert stream.flush() == ["x" * 50]


def test_cjk_full_width_stops_end_sentences_without_spaces() -> None:
    stream = TextStream(auto_mode=True)
    assert stream.push("你好。今天") == ["你好。"]
    assert stream.flush() == ["今天"]


def test_whitespace_only_is_never_a_chunk() -> None:
    stream = TextStream((50,))
    assert stream.push(" ") == []  # ElevenLabs' opening message
    assert stream.flush() == []
    assert stream.buffered == 0


def test_a_flood_of_tiny_pieces_stays_linear_enough() -> None:
    import time

    stream = TextStream((500,), max_chars=500)
    started = time.process_time()  # CPU, not wall: a stalled host adds none
    for _ in range(20_000):
        stream.push("a ")
    assert time.process_time() - started < 5.0  # the buffer never exceeds ~500 characters
    assert stream.buffered <= 500


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError):
        TextStream(())
    with pytest.raises(ValueError):
        TextStream((0,))
