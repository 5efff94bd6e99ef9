"""Chunk timings (:class:`gateway.speech.utterance.ChunkTimings`) in ElevenLabs' two shapes.

- REST (``with-timestamps``): seconds from the start of the whole audio, start and end per
  character (``characters``, ``character_start_times_seconds``, ``character_end_times_seconds``).
- WebSocket (``alignment``, ``normalizedAlignment``): integer milliseconds from the start of
  the chunk's own audio, start and duration per character (``chars``, ``charStartTimesMs``,
  ``charDurationsMs``): ElevenLabs' "relative to the audio chunk that generated them". The
  last character of a chunk ends exactly at the chunk's length, so a client summing chunks
  (Pipecat) lands on every chunk boundary exactly. Durations are taken between rounded
  times, so they add up without drift.

``alignment`` is the text as the client sent it; ``normalizedAlignment`` the text the engine
read (punctuation normalised, see ``gateway.speech.text``). On the WebSocket a chunk whose text
does not end in a space gets one (of no duration, at the chunk's end): clients find words by
the spaces in ``chars`` (Pipecat sends sentences without them).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.http.elevenlabs.protocol import CharacterAlignment, WsAlignment
from gateway.speech.alignment import CharTimings
from gateway.speech.utterance import ChunkTimings

_DECIMALS = 4


def rest_alignment(chunks: Sequence[ChunkTimings], *, spoken: bool) -> CharacterAlignment:
    """The characters of ``chunks`` (in order) with absolute times in seconds."""
    characters: list[str] = []
    starts: list[float] = []
    ends: list[float] = []
    for chunk in chunks:
        timings = (chunk.spoken_chars if spoken else chunk.chars).shifted(chunk.start_s)
        characters.extend(timings.chars)
        starts.extend(round(t, _DECIMALS) for t in timings.starts)
        ends.extend(round(t, _DECIMALS) for t in timings.ends)
    return CharacterAlignment(
        characters=characters, character_start_times_seconds=starts, character_end_times_seconds=ends
    )


def ws_alignment(chunks: Sequence[ChunkTimings], *, spoken: bool) -> WsAlignment:
    """The characters of one or more consecutive chunks (those completed since the previous
    message) in milliseconds from the start of the first one's audio."""
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    origin = chunks[0].start_s if chunks else 0.0
    for chunk in chunks:
        timings: CharTimings = (chunk.spoken_chars if spoken else chunk.chars).shifted(chunk.start_s - origin)
        chars.extend(timings.chars)
        starts.extend(round(t * 1000) for t in timings.starts)
        ends.extend(round(t * 1000) for t in timings.ends)
        if chars and not chars[-1].isspace():
            # A chunk ends a word: clients split words only at " " characters (Pipecat never
            # closes a word left open at the end of a context, and runs a sentence sent as
            # "model." into the next one's "It"), so a chunk whose text ends without a space
            # gets one, of no duration, at its end.
            chars.append(" ")
            starts.append(ends[-1])
            ends.append(ends[-1])
    return WsAlignment(
        chars=chars,
        char_start_times_ms=starts,
        char_durations_ms=[max(0, end - start) for start, end in zip(starts, ends, strict=True)],
    )
