"""When T3's tokens reach the vocoder: in groups that end where the stream's next window
becomes due (``vllm_stream_interval``).

vLLM hands a streaming request's new tokens to this process in groups of its
``stream_interval`` (its first token and its last always at once): each group is one
``RequestOutput`` per stream per step, made by vLLM's output processor and handed through the
engine's token task into the vocoder stream. At hundreds of streams that per-token host work
competes with T3's own steps (H100, 2026-12-05: Turbo at 256 streams 211.7 audio-s/s with
groups of 1, 259.1 with vLLM's plain groups of 8; docs/benchmarks.md). But plain groups delay
the tokens a window waits for: with groups of 8, Turbo's 13-token first window (10 + 3
lookahead) would get its tokens at the 17th.

So with an interval ``cap`` of 2 or more, after each group the request's own interval (vLLM
keeps one per request, ``RequestState.stream_interval``) is set to the tokens still missing
for the vocoder stream's next window (:meth:`VocoderStream.tokens_wanted`), at most ``cap``:
the group that completes a window arrives at the step that made its last token, as with
groups of 1, and between windows (and for one-shot streams, which want every token only at
the end) groups of ``cap`` tokens go. A window the vocoder plans later than its tokens arrive
(the vocoder behind) takes what has come, at most ``cap - 1`` tokens fewer than ungrouped.

vLLM 0.24 keeps ``sent_tokens_offset`` (the request's tokens sent so far) only where the
request's interval was above 1 from the start, which is why the engine's own interval is
``cap`` and this module only ever changes it per request, never from 1. The request's state
lives in the output processor of the engine (``AsyncLLM``'s in this process, run by its output
handler on the event loop; with ``vllm_engine_core = "thread"`` the ``LLMEngine``'s, run by the
engine thread, where setting one int attribute from the event loop is atomic): a late setting
only moves where a group ends, never which tokens it holds (vLLM sends every token from its
offset on).
"""

from __future__ import annotations

from typing import Any


def group_size(wanted: int | None, sent: int, cap: int) -> int:
    """Tokens in a request's next group: those missing up to ``wanted`` (the count its next
    window needs; None: no window waits), at least 1, at most ``cap``."""
    if wanted is None or wanted <= sent:
        return cap
    return max(1, min(cap, wanted - sent))


def regroup(output_processor: Any, request_id: str, wanted: int | None, cap: int) -> None:
    """Set the vLLM request ``request_id``'s interval so that its next group ends at
    ``wanted`` tokens (see :func:`group_size`). ``output_processor``: the engine's (vLLM
    0.24's ``OutputProcessor``); the request's internal ids are vLLM's, found by ours. A
    request vLLM no longer holds (finished, aborted) is left alone."""
    for internal in output_processor.external_req_ids.get(request_id, ()):
        state = output_processor.request_states.get(internal)
        if state is not None:
            state.stream_interval = group_size(wanted, state.sent_tokens_offset, cap)
