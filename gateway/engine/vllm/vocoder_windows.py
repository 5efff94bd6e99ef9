"""Streaming windows over a growing list of speech tokens, and the seams between them.

Pure bookkeeping (no torch): which tokens a window vocodes, what left context and lookahead
it carries, which of its mel frames are new, and how its waveform joins the previous
window's. :mod:`gateway.engine.vllm.vocoder` runs the windows; this module only decides them.

The scheme (CosyVoice 2's streaming token2wav, adapted to S3Gen):

* Flow (tokens -> mel). Window ``k`` commits the mel of tokens ``[start, end)``. Its flow
  input is ``[start - left_context, end + lookahead)``: the encoder's pre-lookahead conv
  reads ``lookahead`` (3) future tokens, so the mel of the last 3 input tokens is not final
  and is dropped (``finalize=False``); the final window has no lookahead and keeps all
  frames. The first window is small (fast first byte), later ones larger, and they keep
  growing (``tokens``, then doubling up to ``max_tokens``): every window re-runs the flow
  over the voice prompt (~250 tokens), so fewer, larger windows cost less per second of
  audio. A stream whose tokens already wait (T3 runs ahead of the vocoder) takes as many of
  them as the cap allows at once, in multiples of ``tokens`` (few distinct shapes); once T3
  has finished the stream, what is left goes as one final window when it is at most
  ``final_merge_tokens`` (by default twice the cap), the first window included: a stream
  whose first window is planned after T3 finished it has waited for the vocoder that long,
  and splitting it would only add flow work. Every window also carries the voice prompt
  (added by the vocoder, not counted here).
* HiFT (mel -> 24 kHz). The window's HiFT input is the last ``mel_overlap`` committed mel
  frames of the previous window followed by its own new frames. The first
  ``mel_overlap * 480`` samples of its output re-synthesise audio the previous window held
  back; the two are crossfaded, and this window holds back its own last
  ``mel_overlap * 480`` samples for the next one (none when final).

Exact equality with one-shot vocoding is impossible by construction: the flow encoder and
the CFM estimator use full (non-causal) self-attention over the whole sequence, so a frame's
mel depends on every token of the utterance, and a streamed window sees only its left
context and 3 lookahead tokens. The parity tool quantifies the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKEN_MEL_RATIO = 2
"""S3Gen makes 2 mel frames per speech token (25 tokens/s -> 50 frames/s)."""
SAMPLES_PER_FRAME = 480
"""HiFT makes 480 samples per mel frame at 24 kHz."""
PRE_LOOKAHEAD_TOKENS = 3
"""Future tokens the flow encoder's pre-lookahead conv reads (upstream pre_lookahead_len)."""


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    first_tokens: int = 20
    """Tokens committed by a stream's first window (small: fast first byte)."""
    tokens: int = 50
    """Tokens committed by the second window."""
    max_tokens: int = 0
    """Later windows double from ``tokens`` up to this (0 or <= ``tokens``: no growth)."""
    left_context: int = 25
    """Already-committed tokens re-encoded before a window (flow context across the seam)."""
    lookahead: int = PRE_LOOKAHEAD_TOKENS
    mel_overlap: int = 8
    """Mel frames re-vocoded across a seam; their audio is crossfaded."""
    final_merge_tokens: int = 0
    """A finished stream vocodes everything left in one final window when at most this many
    tokens remain (0: twice the cap, i.e. ``2 * max(tokens, max_tokens)``; never less than
    the next window plus lookahead); longer tails are split into windows. Once T3 has
    finished (under load it runs far ahead of the vocoder) the rest goes in as few windows
    as this allows, the first window included when T3 finished before it was planned: each
    window re-runs the flow over the voice prompt, so a 250-token utterance vocoded as
    20 + 200 + 30 tokens costs the flow 2152 mel frames, as 20 + 230 1556, as one window 1000
    (docs/benchmarks.md)."""

    first_grow_after_s: float = 0.0
    """A first window that has waited this long for the vocoder (0: never) grows to the
    tokens ready, as a later window does (``size``): under load it saves a window."""
    early_s: float = 0.0
    """A later window that waits for T3's tokens may go early, with those already made (the
    largest of ``early_sizes`` they fill), when its stream's listener is about to run out of
    audio (0: never). The stream decides when (``VocoderStream.ready_window``): its listener
    has less than this many seconds left beyond the vocoder's recent window latency, and T3
    keeps ahead of real time for it."""

    def __post_init__(self) -> None:
        if self.first_grow_after_s < 0 or self.early_s < 0:
            raise ValueError("first_grow_after_s and early_s must be >= 0")
        if min(self.first_tokens, self.tokens) < 1:
            raise ValueError("window sizes must be at least one token")
        if min(self.left_context, self.mel_overlap, self.final_merge_tokens, self.max_tokens) < 0:
            raise ValueError("left_context, mel_overlap, final_merge_tokens and max_tokens must be >= 0")
        if self.lookahead < 1:
            # A non-final window must leave tokens behind, so a final window always follows
            # and flushes the audio held back for the crossfade.
            raise ValueError("lookahead must be >= 1")
        if self.mel_overlap > TOKEN_MEL_RATIO * min(self.first_tokens, self.tokens):
            raise ValueError("mel_overlap must not exceed a window's mel frames")

    @property
    def merge_limit(self) -> int:
        return self.final_merge_tokens or 2 * self.cap

    @property
    def cap(self) -> int:
        return max(self.tokens, self.max_tokens)

    def quick_first(self, window: Window) -> bool:
        """Whether ``window`` is a stream's small first window (the one its first byte waits
        for, solved with ``vocoder_first_window_flow_steps`` when those are set), not a first
        window that took a whole finished utterance."""
        return window.index == 0 and window.new_tokens <= 2 * self.first_tokens

    def size(self, index: int, backlog: int = 0, waited_s: float = 0.0) -> int:
        """Tokens committed by window ``index`` of a stream that has ``backlog`` tokens
        beyond the lookahead ready (0: unknown), its window ready ``waited_s`` seconds ago."""
        ready = min(self.cap, backlog) // self.tokens * self.tokens
        if index == 0:  # small: the first byte waits for it, unless it has waited long already
            grown = 0 < self.first_grow_after_s <= waited_s
            return max(self.first_tokens, ready) if grown else self.first_tokens
        planned = min(self.cap, self.tokens << min(index - 1, 16))
        return max(planned, ready)

    @property
    def early_sizes(self) -> tuple[int, ...]:
        """The sizes an early window takes (``early_s``): multiples of ``first_tokens`` below
        ``tokens``, then the multiples of ``tokens`` a later window takes anyway (few distinct
        shapes: each has its captured HiFT graphs)."""
        small = {k * self.first_tokens for k in range(1, self.tokens // self.first_tokens + 1)}
        return tuple(sorted({n for n in small if n < self.tokens}
                            | {k * self.tokens for k in range(1, self.cap // self.tokens + 1)}))

    def early_size(self, backlog: int) -> int:
        """The largest of ``early_sizes`` that ``backlog`` ready tokens fill (0: none)."""
        return max((n for n in self.early_sizes if n <= backlog), default=0)


@dataclass(frozen=True, slots=True)
class Window:
    """One window of one stream, in token indices of that stream."""

    index: int
    """0 for the stream's first window."""
    context_start: int
    """First token fed to the flow (left context begins here)."""
    start: int
    """First token whose mel this window commits."""
    end: int
    """One past the last committed token."""
    input_end: int
    """One past the last token fed to the flow (``end + lookahead`` unless final)."""
    final: bool

    @property
    def new_tokens(self) -> int:
        return self.end - self.start

    @property
    def input_tokens(self) -> int:
        return self.input_end - self.context_start

    @property
    def mel_frames_out(self) -> int:
        """Mel frames the flow returns for the window's tokens (prompt excluded)."""
        return TOKEN_MEL_RATIO * (self.end - self.context_start)

    @property
    def new_mel_frames(self) -> int:
        """The trailing frames of the flow output that are new (committed by this window)."""
        return TOKEN_MEL_RATIO * self.new_tokens


def next_window(policy: WindowPolicy, *, available: int, committed: int, finished: bool,
                index: int, one_shot: bool = False, waited_s: float = 0.0, early: bool = False) -> Window | None:
    """The next window of a stream with ``available`` tokens of which ``committed`` have
    been vocoded, or None when it must wait for more tokens (or is done).

    ``one_shot``: vocode the whole utterance as one final window once it is finished
    (non-streaming requests: best quality, still batched with other streams).
    ``waited_s``: how long the stream's window has been ready (a first window may grow).
    ``early``: a later window that would wait for tokens goes with those it has, at the
    largest of the policy's ``early_sizes`` they fill (its listener is about to run out).
    """
    remaining = available - committed
    if remaining <= 0 or (one_shot and not finished):
        return None
    context_start = max(0, committed - policy.left_context)
    size = policy.size(index, remaining - policy.lookahead, waited_s)
    # Once T3 has finished, what is left goes in one final window when it fits the limit:
    # each window saved is a flow pass over the voice prompt saved. The first window too: a
    # stream T3 finished before the vocoder planned its first window waited that long already
    # (the vocoder is the bottleneck), and the one window's row costs its batch little more.
    if finished and (one_shot or remaining <= max(policy.merge_limit, size + policy.lookahead)):
        return Window(index, context_start, committed, available, available, final=True)
    if remaining < size + policy.lookahead:
        if not early or index == 0:
            return None
        size = policy.early_size(remaining - policy.lookahead)
        if size <= 0:
            return None
    end = committed + size
    return Window(index, context_start, committed, end, end + policy.lookahead, final=False)


def fill_window(window: Window, *, room: int, available: int) -> Window:
    """``window`` grown by up to ``room`` more tokens of the ``available`` ones (those beyond
    its input: T3 ran ahead), when it is a later window that does not end the stream.

    Its flow solve runs at a padded width whatever the row uses (a CUDA graph's: 926 frames of
    a 200-token window solved at 1024), so the tokens that fit the padding (``room``, from the
    vocoder) are vocoded at no extra flow cost: each window re-runs the flow over the voice
    prompt, so more audio per window is less flow per second of audio. A first window is left
    as planned (its own solver and schedule, and the first byte waits for it); a final window
    takes everything already."""
    if window.final or window.index == 0 or room <= 0:
        return window
    grow = min(room, available - window.input_end)
    if grow <= 0:
        return window
    return Window(window.index, window.context_start, window.start, window.end + grow, window.input_end + grow,
                  final=False)


def crossfade_weights(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fade-in and fade-out weights over ``n`` samples that sum to exactly 1.

    Raised-cosine halves rather than CosyVoice's Hamming halves: the two signals being
    joined are re-syntheses of the same audio (correlated), so amplitude weights must sum
    to 1; Hamming halves sum to ~1.08 and would put a small bump at every seam.
    """
    fade_in = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float64) + 0.5) / n)).astype(np.float32)
    return fade_in, (1.0 - fade_in).astype(np.float32)


@dataclass(slots=True)
class SeamState:
    """Per-stream waveform state carried from one window to the next (HiFT side).

    The mel tail itself stays on the device with the vocoder; this tracks positions and
    the held-back samples.
    """

    held: np.ndarray | None = None
    """Samples synthesised but not yet emitted (crossfaded with the next window's start)."""
    carried_frames: int = 0
    """Mel frames of the previous window re-vocoded at the start of the next one."""
    frames_committed: int = 0
    """Mel frames of the stream vocoded so far."""
    samples_emitted: int = 0

    def hift_start_frame(self) -> int:
        """Absolute mel frame where the next window's HiFT input begins."""
        return self.frames_committed - self.carried_frames

    def carry_for(self, new_frames: int, *, mel_overlap: int, final: bool) -> int:
        """How many trailing frames of the next HiFT input (``carried_frames`` + ``new_frames``
        long) to carry into the window after it."""
        return 0 if final else min(mel_overlap, self.carried_frames + new_frames)

    def join(self, audio: np.ndarray, *, hift_frames: int, carry: int) -> np.ndarray:
        """Take one window's HiFT output (``hift_frames`` mel frames, the first
        ``carried_frames`` of them carried over), return the samples that are now final, and
        hold back the last ``carry`` frames' samples for the next window's crossfade."""
        if audio.shape[0] != hift_frames * SAMPLES_PER_FRAME:
            raise ValueError("HiFT output length does not match its mel frames")
        audio = audio.astype(np.float32, copy=True)
        if self.held is not None:
            overlap = self.held.shape[0]
            fade_in, fade_out = crossfade_weights(overlap)
            audio[:overlap] = audio[:overlap] * fade_in + self.held * fade_out
        self.frames_committed += hift_frames - self.carried_frames
        split = audio.shape[0] - carry * SAMPLES_PER_FRAME
        out = audio[:split]
        self.held = audio[split:] if carry else None
        self.carried_frames = carry
        self.samples_emitted += out.shape[0]
        return out
