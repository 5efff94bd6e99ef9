"""The batched streaming vocoder: window planning and seams (pure), then the real S3Gen with
random weights at tiny sizes: parity checks, the loop's batching, priority, cancel and errors."""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gateway.engine.vllm.vocoder import Vocoder
from gateway.engine.vllm.vocoder_windows import (
    SAMPLES_PER_FRAME,
    SeamState,
    WindowPolicy,
    crossfade_weights,
    fill_window,
    next_window,
)
from gateway.errors import EngineError, EngineUnavailableError
from gateway.settings import load_settings
from gateway.tools import parity_vocoder
from gateway.tools.parity_vocoder import Sizes

# --- windows (pure) -----------------------------------------------------------------------


def _plan(policy: WindowPolicy, total: int, arrival: int, one_shot: bool = False, waited_s: float = 0.0,
          room: int = 0):
    """Feed ``total`` tokens ``arrival`` at a time, committing each window as soon as planned
    (each as if ready ``waited_s`` seconds already; later windows filled by up to ``room``
    tokens, as a stream does where graph padding leaves room)."""
    windows, available, committed = [], 0, 0
    while True:
        finished = available >= total
        w = next_window(policy, available=available, committed=committed, finished=finished,
                        index=len(windows), one_shot=one_shot, waited_s=waited_s)
        if w is not None and room:
            w = fill_window(w, room=room, available=available)
        if w is not None:
            assert w.input_end <= available, "a window must only read tokens that arrived"
            windows.append(w)
            committed = w.end
            continue
        if finished:
            return windows
        available = min(total, available + arrival)


@pytest.mark.parametrize("total", [1, 5, 20, 23, 24, 73, 200])
@pytest.mark.parametrize("arrival", [1, 7, 1000])
@pytest.mark.parametrize("policy", [WindowPolicy(), WindowPolicy(first_tokens=6, tokens=8, left_context=4),
                                    WindowPolicy(first_tokens=40, tokens=10, final_merge_tokens=1),
                                    WindowPolicy(first_tokens=6, tokens=8, left_context=4, max_tokens=30)])
def test_windows_tile_the_stream_exactly(policy: WindowPolicy, total: int, arrival: int) -> None:
    windows = _plan(policy, total, arrival)
    assert windows[0].start == 0 and windows[-1].end == total
    assert [w.final for w in windows] == [False] * (len(windows) - 1) + [True]
    for prev, w in zip(windows, windows[1:]):
        assert w.start == prev.end
    for w in windows:
        assert w.context_start == max(0, w.start - policy.left_context)
        if not w.final:
            if w.index == 0:
                assert w.new_tokens == policy.first_tokens
            else:  # the planned size, or more when tokens were waiting, in steps of `tokens`
                assert policy.size(w.index) <= w.new_tokens <= policy.cap
                assert w.new_tokens % policy.tokens == 0 or w.new_tokens == policy.size(w.index)
            assert w.input_end == w.end + policy.lookahead
        else:
            assert w.input_end == w.end
        assert w.mel_frames_out == 2 * (w.end - w.context_start)
        assert w.new_mel_frames == 2 * w.new_tokens


def test_first_window_is_small_and_waits_for_lookahead() -> None:
    policy = WindowPolicy(first_tokens=20, tokens=50)
    assert next_window(policy, available=22, committed=0, finished=False, index=0) is None
    w = next_window(policy, available=23, committed=0, finished=False, index=0)
    assert (w.start, w.end, w.input_end, w.final) == (0, 20, 23, False)
    assert next_window(policy, available=72, committed=20, finished=False, index=1) is None
    w = next_window(policy, available=73, committed=20, finished=False, index=1)
    assert (w.context_start, w.start, w.end) == (0, 20, 70)


def test_a_stream_finished_before_its_first_window_is_vocoded_whole_when_it_fits() -> None:
    # T3 finished the utterance before the vocoder got to the stream (the vocoder is behind):
    # one window, not a small one and the rest (a flow pass over the voice prompt fewer).
    policy = WindowPolicy(first_tokens=20, tokens=50)
    w = next_window(policy, available=90, committed=0, finished=True, index=0)
    assert (w.end, w.final) == (90, True) and not policy.quick_first(w)
    w = next_window(policy, available=40, committed=0, finished=True, index=0)
    assert (w.end, w.final) == (40, True) and policy.quick_first(w)
    w = next_window(policy, available=120, committed=20, finished=True, index=1)
    assert (w.end, w.final) == (120, True) and not policy.quick_first(w)
    # Longer than the limit (twice the window here): the small first window, then the rest.
    w = next_window(policy, available=150, committed=0, finished=True, index=0)
    assert (w.end, w.final) == (20, False) and policy.quick_first(w)
    # Still arriving: the small first window, whatever waits.
    w = next_window(policy, available=90, committed=0, finished=False, index=0)
    assert (w.end, w.final) == (20, False)


def test_windows_grow_to_the_cap_and_take_a_backlog_at_once() -> None:
    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200)
    assert [policy.size(i) for i in range(6)] == [20, 50, 100, 200, 200, 200]
    # Tokens trickling in: each window waits for its planned size plus the lookahead.
    assert next_window(policy, available=122, committed=20, finished=False, index=2) is None
    w = next_window(policy, available=73, committed=20, finished=False, index=1)
    assert (w.start, w.end, w.input_end) == (20, 70, 73)
    w = next_window(policy, available=173, committed=70, finished=False, index=2)
    assert (w.start, w.end) == (70, 170)
    # T3 ran ahead: the second window takes the waiting tokens (multiples of 50, capped).
    w = next_window(policy, available=180, committed=20, finished=False, index=1)
    assert (w.end, w.final) == (170, False)
    w = next_window(policy, available=400, committed=20, finished=False, index=1)
    assert (w.end, w.input_end) == (220, 223)
    # The first window stays small whatever waits (time to first audio).
    w = next_window(policy, available=400, committed=0, finished=False, index=0)
    assert w.end == 20
    # Without max_tokens nothing grows.
    assert WindowPolicy(tokens=50).size(5, backlog=500) == 50


def test_a_later_window_takes_the_waiting_tokens_that_fit_its_graph_padding() -> None:
    """``vocoder_fill_graphs``: the room the flow solve's padding leaves is filled from the
    tokens already made; never beyond what arrived (the lookahead still read), never a first
    or a final window."""
    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200)
    w = next_window(policy, available=400, committed=20, finished=False, index=1)
    assert (w.end, w.input_end) == (220, 223)
    grown = fill_window(w, room=49, available=400)
    assert (grown.start, grown.context_start, grown.end, grown.input_end, grown.final) == (20, w.context_start, 269, 272, False)
    assert fill_window(w, room=49, available=250).input_end == 250, "only tokens that arrived"
    assert fill_window(w, room=49, available=223) == w, "nothing beyond the lookahead yet"
    assert fill_window(w, room=0, available=400) == w
    first = next_window(policy, available=400, committed=0, finished=False, index=0)
    assert fill_window(first, room=49, available=400) == first
    final = next_window(policy, available=300, committed=20, finished=True, index=1)
    assert final.final and fill_window(final, room=49, available=300) == final


@pytest.mark.parametrize("total", [24, 73, 200, 517])
@pytest.mark.parametrize("arrival", [1, 7, 60, 1000])
@pytest.mark.parametrize("room", [1, 13, 120])
def test_filled_windows_still_tile_the_stream_exactly(total: int, arrival: int, room: int) -> None:
    policy = WindowPolicy(first_tokens=6, tokens=8, left_context=4, max_tokens=30)
    plain, filled = _plan(policy, total, arrival), _plan(policy, total, arrival, room=room)
    for windows in (plain, filled):
        assert windows[0].start == 0 and windows[-1].end == total
        assert [w.final for w in windows] == [False] * (len(windows) - 1) + [True]
        assert all(w.start == prev.end for prev, w in zip(windows, windows[1:]))
    assert filled[0] == plain[0], "the first window is the schedule's"
    for w in filled[1:-1]:
        assert w.input_end == w.end + policy.lookahead and w.new_tokens <= policy.cap + room
    assert len(filled) <= len(plain)
    if arrival >= 60 and total >= 200 and room >= 13:  # T3 ahead of the vocoder: the windows grew
        assert len(filled) < len(plain)


def test_a_first_window_that_waited_for_the_vocoder_takes_what_t3_made_meanwhile() -> None:
    """``stream_first_window_grow_after_s``: a first window the vocoder takes at once stays
    small; one still waiting after the threshold takes the ready tokens in steps of the
    second window's size, up to the cap (a whole finished utterance as before); off (0) it
    never grows, however long it waited."""
    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200, first_grow_after_s=1.0)
    assert policy.size(0, backlog=397, waited_s=0.99) == 20
    assert policy.size(0, backlog=397, waited_s=1.0) == 200
    assert policy.size(0, backlog=130, waited_s=3.0) == 100
    assert policy.size(0, backlog=30, waited_s=3.0) == 20  # fewer than a step ready: as it was
    w = next_window(policy, available=133, committed=0, finished=False, index=0, waited_s=1.5)
    assert (w.index, w.context_start, w.start, w.end, w.input_end, w.final) == (0, 0, 0, 100, 103, False)
    assert not policy.quick_first(w)  # solved with the regular steps, not the first-window knob
    w = next_window(policy, available=133, committed=0, finished=False, index=0, waited_s=0.2)
    assert w.end == 20 and policy.quick_first(w)
    w = next_window(policy, available=250, committed=0, finished=True, index=0, waited_s=1.5)
    assert (w.end, w.final) == (250, True)
    never = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200)
    assert never.size(0, backlog=397, waited_s=3600.0) == 20
    with pytest.raises(ValueError):
        WindowPolicy(first_grow_after_s=-1.0)


@pytest.mark.parametrize("total", [1, 23, 73, 200, 700])
@pytest.mark.parametrize("arrival", [1, 7, 60, 1000])
def test_grown_first_windows_still_tile_the_stream_exactly(total: int, arrival: int) -> None:
    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200, first_grow_after_s=0.5)
    windows = _plan(policy, total, arrival, waited_s=1.0)
    assert windows[0].start == 0 and windows[-1].end == total
    assert [w.final for w in windows] == [False] * (len(windows) - 1) + [True]
    assert all(w.start == prev.end for prev, w in zip(windows, windows[1:]))
    assert all(w.input_end <= total for w in windows)


def test_a_first_windows_wait_counts_from_its_tokens_not_from_when_the_loop_looked() -> None:
    """The vocoder loop plans only between batches: a stream whose first window's tokens came
    while two batches ran is looked at for the first time seconds later. Its wait (for
    ``first_grow_after_s``) counts from when T3 had made those tokens."""
    import time
    from types import SimpleNamespace

    from gateway.engine.vllm.vocoder_stream import VocoderStream

    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200, first_grow_after_s=1.0)
    host = SimpleNamespace(policy=policy, trim_fade=np.zeros(0, np.float32), wake=lambda: None,
                           next_ticket=lambda: 0, forget=lambda _s: None, count_dropped=lambda: None)
    early, late = (VocoderStream(host, "v", {}, one_shot=False) for _ in range(2))
    t_due = time.monotonic()
    for stream in (early, late):
        stream.push(range(133))  # the first window's 23 tokens and more, at once
    assert early.ready_window(t_due + 0.5).end == 20  # looked at half a second later: small
    grown = late.ready_window(t_due + 1.5)  # first looked at after 1.5 s: it has waited that long
    assert (grown.index, grown.end) == (0, 100)


def test_grown_first_windows_have_hift_graphs() -> None:
    """A grown first window's HiFT call (its new frames, no carried ones) is a shape the
    graphs cover when growth is on, so it is not the one eager call of its batch."""
    from gateway.engine.vllm.vocoder import hift_graph_shapes

    grow = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200, first_grow_after_s=1.0)
    frames = {f for _, f in hift_graph_shapes(grow, 8)}
    assert {40, 100, 200, 300, 400} <= frames
    assert 100 not in {f for _, f in hift_graph_shapes(WindowPolicy(first_tokens=20, tokens=50, max_tokens=200), 8)}


def test_an_early_window_takes_the_largest_early_size_its_ready_tokens_fill() -> None:
    policy = WindowPolicy(first_tokens=12, tokens=50, max_tokens=200, early_s=0.3)  # served sizes
    assert policy.early_sizes == (12, 24, 36, 48, 50, 100, 150, 200)
    # the second window (50 planned) with 40 tokens beyond its 3-token lookahead: it waits...
    kw = dict(available=12 + 43, committed=12, finished=False, index=1)
    assert next_window(policy, **kw) is None
    # ...unless its listener is about to run out: then 36 of them go
    w = next_window(policy, **kw, early=True)
    assert (w.start, w.end, w.input_end, w.final) == (12, 48, 51, False)
    # a third window (100 planned) with 60 ready takes 50; fewer than 12 ready: still waits
    w = next_window(policy, available=62 + 63, committed=62, finished=False, index=2, early=True)
    assert (w.start, w.end) == (62, 112)
    assert next_window(policy, available=12 + 14, committed=12, finished=False, index=1, early=True) is None
    # a first window is never early (its own size and schedule)
    assert next_window(policy, available=10, committed=0, finished=False, index=0, early=True) is None


def test_a_stream_goes_early_only_when_its_listener_is_short_and_t3_keeps_ahead() -> None:
    from types import SimpleNamespace

    from gateway.engine.vllm.vocoder_stream import VocoderStream

    policy = WindowPolicy(first_tokens=12, tokens=50, max_tokens=200, early_s=0.3)
    host = SimpleNamespace(policy=policy, trim_fade=np.zeros(0, np.float32), wake=lambda: None,
                           next_ticket=lambda: 0, forget=lambda _s: None, count_dropped=lambda: None,
                           flow_room=lambda _t: 0, window_latency_s=0.0, note_window_latency=lambda _s: None)

    def playing(now: float, *, heard_s: float, t3_for_s: float, made: int = 55) -> VocoderStream:
        """A stream whose 12-token first window (0.48 s) was delivered, ``heard_s`` of it
        played by ``now``, T3 having made ``made`` tokens over ``t3_for_s`` seconds."""
        stream = VocoderStream(host, "v", {}, one_shot=False)
        stream.push(range(made))
        stream._index, stream._committed = 1, 12
        stream._seam.samples_emitted = 12 * 2 * SAMPLES_PER_FRAME
        stream._first_audio_at, stream._first_token_at = now - heard_s, now - t3_for_s
        return stream

    now = time.monotonic()
    assert playing(now, heard_s=0.3, t3_for_s=1.0).ready_window(now).end == 48, "0.18 s left: early"
    assert playing(now, heard_s=0.1, t3_for_s=1.0).ready_window(now) is None, "0.38 s left: waits"
    host.window_latency_s = 0.2  # the vocoder's recent latency widens the margin
    assert playing(now, heard_s=0.1, t3_for_s=1.0).ready_window(now).end == 48
    # T3 made 2.2 s of audio in 2 s (1.1x real time, the card overloaded): no early window
    assert playing(now, heard_s=0.3, t3_for_s=2.0).ready_window(now) is None
    off = WindowPolicy(first_tokens=12, tokens=50, max_tokens=200)
    host.policy = off
    assert playing(now, heard_s=0.45, t3_for_s=1.0).ready_window(now) is None, "early_s 0: the schedule"


async def test_the_vocoder_keeps_a_moving_average_of_window_latency(s3gen, ref) -> None:
    from gateway.engine.vllm.vocoder import served_policy

    assert served_policy(load_settings({}, {"stream_early_window_s": 0.4})).early_s == 0.4
    voc = _vocoder(s3gen)
    assert voc.window_latency_s == 0.0
    voc.note_window_latency(1.0)
    voc.note_window_latency(0.0)
    assert voc.window_latency_s == pytest.approx(0.8)
    await voc.start()
    try:  # a delivered window notes its own (seconds here, not 0.8)
        await voc.vocode("A", ref, _tokens(8, 5))
    finally:
        await voc.close()
    assert voc.window_latency_s != pytest.approx(0.8)


def test_early_windows_have_hift_graphs() -> None:
    from gateway.engine.vllm.vocoder import hift_graph_shapes

    early = WindowPolicy(first_tokens=12, tokens=50, max_tokens=200, early_s=0.3)
    frames = {f for _, f in hift_graph_shapes(early, 8)}
    assert {8 + 24, 8 + 48, 8 + 72, 8 + 96} <= frames  # the carried 8, then 12/24/36/48 tokens
    assert 8 + 24 not in {f for _, f in hift_graph_shapes(WindowPolicy(first_tokens=12, tokens=50, max_tokens=200), 8)}


def test_a_finished_stream_vocodes_what_is_left_in_as_few_windows_as_the_final_limit_allows() -> None:
    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200)  # served sizes
    assert policy.merge_limit == 400  # by default twice the cap
    # T3 done with a 250-token utterance (as under load): after the small first window, the
    # other 230 in one final window, not 200 then 30 (one flow pass over the prompt fewer).
    w = next_window(policy, available=250, committed=20, finished=True, index=1)
    assert (w.start, w.end, w.final) == (20, 250, True)
    # Longer than the limit: windows of the cap until what is left fits.
    w = next_window(policy, available=500, committed=20, finished=True, index=1)
    assert (w.end, w.final) == (220, False)
    w = next_window(policy, available=500, committed=220, finished=True, index=2)
    assert (w.end, w.final) == (500, True)
    # Not finished: the cap holds, whatever waits.
    w = next_window(policy, available=250, committed=20, finished=False, index=1)
    assert (w.end, w.final) == (220, False)
    # Finished before its first window was planned: the whole utterance at once.
    w = next_window(policy, available=250, committed=0, finished=True, index=0)
    assert (w.end, w.final) == (250, True)
    # The rule until 2026-12-05 (twice the second window) as an explicit limit.
    old = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200, final_merge_tokens=100)
    w = next_window(old, available=250, committed=20, finished=True, index=1)
    assert (w.end, w.final) == (220, False)
    # Without growth the default is what it always was: twice the window.
    assert WindowPolicy(tokens=50).merge_limit == 100


def test_the_served_policy_takes_the_final_window_setting(s3gen) -> None:
    settings = load_settings({}, {"flow_steps": 2, "max_speech_tokens": 64, "stream_final_window_tokens": 120})
    vocoder = Vocoder(s3gen, settings)
    assert (vocoder.policy.merge_limit, vocoder.policy.cap) == (120, settings.stream_max_window_tokens)
    default = Vocoder(s3gen, load_settings({}, {"flow_steps": 2, "max_speech_tokens": 64}))
    assert default.policy.merge_limit == 2 * settings.stream_max_window_tokens


def test_one_shot_waits_for_finish_then_takes_everything() -> None:
    policy = WindowPolicy()
    assert next_window(policy, available=500, committed=0, finished=False, index=0, one_shot=True) is None
    w = next_window(policy, available=500, committed=0, finished=True, index=0, one_shot=True)
    assert (w.start, w.end, w.final) == (0, 500, True)
    assert next_window(policy, available=500, committed=500, finished=True, index=1) is None


def test_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        WindowPolicy(first_tokens=0)
    with pytest.raises(ValueError):
        WindowPolicy(left_context=-1)
    with pytest.raises(ValueError):
        WindowPolicy(first_tokens=2, mel_overlap=8)
    with pytest.raises(ValueError):
        WindowPolicy(lookahead=0)


def test_crossfade_weights_sum_to_one() -> None:
    fade_in, fade_out = crossfade_weights(3840)
    np.testing.assert_allclose(fade_in + fade_out, 1.0, atol=1e-6)
    assert fade_in[0] < 0.01 and fade_in[-1] > 0.99 and np.all(np.diff(fade_in) > 0)


def test_seams_emit_every_sample_once_and_keep_a_constant_constant() -> None:
    seam = SeamState()
    out = []
    windows = [(20, False), (50, False), (50, False), (7, True)]  # new frames per window
    for frames, final in windows:
        carry = seam.carry_for(frames, mel_overlap=8, final=final)
        hift_frames = seam.carried_frames + frames
        assert seam.hift_start_frame() == seam.frames_committed - seam.carried_frames
        out.append(seam.join(np.ones(hift_frames * SAMPLES_PER_FRAME, np.float32), hift_frames=hift_frames,
                             carry=carry))
    audio = np.concatenate(out)
    assert audio.shape[0] == sum(f for f, _ in windows) * SAMPLES_PER_FRAME == seam.samples_emitted
    np.testing.assert_allclose(audio, 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        SeamState().join(np.ones(100, np.float32), hift_frames=1, carry=0)


# --- the real S3Gen (random weights, tiny sizes) ------------------------------------------

SIZES = Sizes(prompt_tokens=12, utterances=(27, 15), flow_steps=1, first_window=6, window=8, left_context=4)
POLICY = WindowPolicy(first_tokens=6, tokens=8, left_context=4, final_merge_tokens=8)


@pytest.fixture(scope="module")
def ref(s3gen):
    s3gen.float()  # embed_ref runs in the flow's dtype; a bf16 test may have cast it
    return parity_vocoder.reference_dict(s3gen, SIZES.prompt_tokens, 120.0, 0)


def _vocoder(s3gen, **settings) -> Vocoder:
    base = {"flow_steps": 1, "max_speech_tokens": 64}
    base.update(settings)
    return Vocoder(s3gen, load_settings({}, base), policy=POLICY)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.slow
def test_parity_checks_pass_on_cpu(s3gen) -> None:
    results = parity_vocoder.run("cpu", torch.float32, SIZES, s3gen=s3gen)
    names = {r.name for r in results}
    assert len(names) == 8 and all(r.passed for r in results), results
    assert any("watermark on" in n for n in names) and "hift: fused kernels == upstream's modules" in names
    streamed = next(r for r in results if "streamed" in r.name)
    assert math.isfinite(streamed.value), "the streamed check must really window the streams"


def test_a_parity_check_that_raises_fails_by_name_and_the_rest_still_run(capsys) -> None:
    """What the GPU visit of 2026-12-06 needed: its stepped-graph check raised and took the
    varlen checks queued behind it down with the run."""
    def crashes(rows: int) -> list:
        raise TypeError("'int' object is not callable")

    ok = parity_vocoder.CheckResult("flow: fine", True, 60.0, 25.0)
    results = parity_vocoder._Printed()
    results += parity_vocoder._guarded("flow: stepped CFM graphs", crashes, 4)
    results += parity_vocoder._guarded("flow: varlen attention", lambda: [ok])
    failed, passed = results
    assert (failed.name, failed.passed) == ("flow: stepped CFM graphs: raised", False)
    assert failed.detail == "TypeError: 'int' object is not callable" and failed.value == float("-inf")
    assert passed is ok
    captured = capsys.readouterr()
    assert "FAIL flow: stepped CFM graphs: raised" in captured.out and "PASS flow: fine" in captured.out
    assert "Traceback" in captured.err


@pytest.mark.slow
def test_parity_checks_run_in_bf16(s3gen) -> None:
    """The serving dtype's plumbing (flow in bf16, HiFT in fp32) on CPU; tolerances per dtype."""
    results = parity_vocoder.run("cpu", torch.bfloat16, SIZES, s3gen=s3gen)
    assert len(results) == 7 and all(r.passed for r in results), results
    assert s3gen.flow.encoder_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in s3gen.mel2wav.parameters())


@pytest.mark.slow
async def test_loop_batches_concurrent_streams_as_tokens_arrive(s3gen, ref) -> None:
    batches = []
    voc = _vocoder(s3gen)
    voc.on_batch = lambda rows, tokens, seconds: batches.append(rows)
    await voc.start()
    try:
        lengths = (22, 17, 9)
        streams = [voc.open_stream("A", ref) for _ in lengths]

        async def produce(stream, tokens):
            for i in range(0, len(tokens), 5):  # T3 yields small deltas
                stream.push(tokens[i:i + 5])
                await asyncio.sleep(0)
            stream.push([6561, 6562])  # start/stop ids never reach S3Gen
            stream.finish()

        async def consume(stream):
            return [a async for a in stream.audio()]

        tokens = [_tokens(n, i) for i, n in enumerate(lengths)]
        chunks = (await asyncio.gather(*[produce(s, t) for s, t in zip(streams, tokens)],
                                       *[consume(s) for s in streams]))[len(lengths):]
    finally:
        await voc.close()
    for n, parts in zip(lengths, chunks):
        assert all(p.dtype == np.float32 for p in parts)
        assert sum(p.shape[0] for p in parts) == n * 2 * SAMPLES_PER_FRAME
        assert np.isfinite(np.concatenate(parts)).all()
    st = voc.stats
    assert st.rows == sum(st.rows_per_batch[k] * k for k in st.rows_per_batch) == sum(batches)
    assert st.batches == len(batches) < st.rows, "windows of different streams must share batches"
    assert st.first_window_rows == len(lengths) and max(batches) > 1
    assert math.isclose(st.audio_s, sum(lengths) / 25)


@pytest.mark.slow
async def test_first_windows_are_served_before_later_windows(s3gen, ref) -> None:
    voc = _vocoder(s3gen, vocoder_max_batch=1)
    await voc.start()
    order = []
    try:
        a = voc.open_stream("A", ref)
        b = voc.open_stream("A", ref)
        a.push(_tokens(40, 1))  # enough for several windows
        b.push(_tokens(9, 2))   # one first window

        async def consume(name, stream):
            async for _ in stream.audio():
                order.append(name)

        ta = asyncio.create_task(consume("a", a))
        tb = asyncio.create_task(consume("b", b))
        while len(order) < 3:
            await asyncio.sleep(0.01)
        a.cancel()
        b.cancel()
        await asyncio.gather(ta, tb)
    finally:
        await voc.close()
    assert order[:3] == ["a", "b", "a"], order


@pytest.mark.slow
async def test_a_stream_whose_tokens_wait_fills_the_graph_width_of_its_windows(s3gen, ref) -> None:
    """``vocoder_fill_graphs``: with CUDA graph widths (set as if captured; on the CPU the solves
    run eager), a later window takes the waiting tokens that fit the width its flow pads to:
    27 flow tokens (12 of prompt, 4 of context, 8 new, 3 of lookahead) pad to 32, so 13 new
    tokens a window, not 8. Every sample is still there; off, or without graphs, the
    schedule's sizes."""
    from gateway.engine.vllm.cfm_solver import GraphBuckets

    tokens = _tokens(40, 5)

    async def ends(fill: bool, graphs: bool) -> tuple[list[int], int]:
        voc = _vocoder(s3gen, vocoder_fill_graphs=fill)  # off by default
        if graphs:
            voc.batch.cfm.buckets = GraphBuckets(rows=(1, 2, 4), frames=(64, 96, 128), max_cells=1 << 20)
        await voc.start()
        try:
            stream = voc.open_stream("A", ref)
            stream.push(tokens)  # T3 far ahead of the vocoder: every token already waiting
            committed, samples = [], 0
            async for audio, end in stream.chunks():
                committed.append(end)
                samples += audio.shape[0]
                if end >= 30 and sum(e >= 30 for e in committed) == 1:
                    stream.finish()  # the rest once 30 are vocoded
        finally:
            await voc.close()
        return committed, samples

    filled, samples = await ends(True, True)
    assert filled[:3] == [6, 19, 32] and filled[-1] == 40 and samples == 40 * 2 * SAMPLES_PER_FRAME
    plain, samples = await ends(False, True)
    assert plain[:4] == [6, 14, 22, 30] and plain[-1] == 40 and samples == 40 * 2 * SAMPLES_PER_FRAME
    assert (await ends(True, False))[0] == plain, "eager solves pad nothing: nothing to fill"


@pytest.mark.slow
async def test_cancel_drops_the_stream_and_others_continue(s3gen, ref) -> None:
    voc = _vocoder(s3gen)
    await voc.start()
    try:
        doomed = voc.open_stream("A", ref)
        doomed.push(_tokens(60, 3))
        survivor = voc.open_stream("A", ref)
        survivor.push(_tokens(12, 4))
        survivor.finish()
        audio = doomed.audio()
        first = await audio.__anext__()
        assert first.size > 0
        await audio.aclose()  # what the HTTP layer does on disconnect
        rows_before = voc.stats.rows
        rest = [a async for a in survivor.audio()]
        assert sum(a.shape[0] for a in rest) == 12 * 2 * SAMPLES_PER_FRAME
        await asyncio.sleep(0.05)
        assert doomed.closed and doomed.tokens_vocoded < 60
        assert voc.stats.rows - rows_before <= 2, "the cancelled stream must not be vocoded further"
        doomed.push([1, 2, 3])  # late T3 deltas after a cancel are ignored
        assert doomed.tokens_vocoded < 60 and doomed.closed
        with pytest.raises(RuntimeError):
            survivor.push([1, 2, 3])
    finally:
        await voc.close()


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{}, {"vocoder_first_window_lane_rows": 2, "vocoder_first_window_preempt": True}],
                         ids=["one loop", "lane and preempting main loop"])
async def test_an_idle_vocoder_keeps_no_window_of_its_last_batch_alive(s3gen, ref, monkeypatch, settings) -> None:
    """Once its streams have ended (one cancelled) and its loops idle, no window's mel is
    alive. The twenty-fourth GPU visit's CUDA snapshot after a load test: the main loop's
    locals held its last batch (61 rows' mels and, through their tails, the windows before)
    until the next launch; garbage collection did not free them."""
    import gc
    import weakref

    from gateway.engine.vllm import vocoder as vocoder_module

    made: list[weakref.ref] = []
    real = vocoder_module.HiftRow

    def recording(mel, *rest):
        made.append(weakref.ref(mel))
        return real(mel, *rest)

    monkeypatch.setattr(vocoder_module, "HiftRow", recording)
    voc = _vocoder(s3gen, flow_steps=2, **settings)
    loops = [voc] + ([voc.first_lane] if voc.first_lane is not None else [])
    await voc.start()
    try:
        streams = [voc.open_stream("A", ref) for _ in range(3)]
        for i, stream in enumerate(streams):
            stream.push(_tokens(30, 20 + i))
        doomed = streams[0].audio()
        await doomed.__anext__()
        await doomed.aclose()  # a client that hung up mid-stream
        for stream in streams[1:]:
            stream.finish()
        for stream in streams[1:]:
            assert [a async for a in stream.audio()]
        deadline = time.monotonic() + 30
        while any(v._in_flight for v in loops) or voc.open_streams:
            assert time.monotonic() < deadline, "the vocoder never went idle"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the loops reach their wait
        streams = doomed = stream = None
        gc.collect()
        assert len(made) >= 6, "several batches ran, later windows among them"
        alive = [tuple(m.shape) for r in made if (m := r()) is not None]
        assert alive == [], f"mels still held by an idle vocoder: {alive}"
    finally:
        await voc.close()


@pytest.mark.slow
async def test_batch_failure_fails_its_streams_and_close_fails_open_ones(s3gen, ref) -> None:
    voc = _vocoder(s3gen)
    await voc.start()
    try:
        broken = voc.open_stream("broken", {"prompt_token": ref["prompt_token"]})  # no prompt_feat
        healthy = voc.open_stream("A", ref)
        for stream in (broken, healthy):
            stream.push(_tokens(8, 5))  # one final window each, planned into one batch
            stream.finish()
        with pytest.raises(EngineError):
            async for _ in broken.audio():
                pass
        assert sum(a.shape[0] for a in [a async for a in healthy.audio()]) == 8 * 2 * SAMPLES_PER_FRAME
        assert voc.stats.rows_per_batch == {1: 1}, "the broken row fails alone, its batch-mate runs"
        prompt = len(ref["prompt_token"].reshape(-1))
        assert voc.stats.cfm_frames == voc.stats.cfm_solved_frames == 2 * (prompt + 8), "one final row, unpadded"
        assert voc.stats.hift_frames == voc.stats.hift_eager_frames == 2 * 8, "its HiFT: no graphs on the CPU"
        waiting = voc.open_stream("A", ref)
        waiting.push(_tokens(3, 6))  # too few tokens for a window: nothing in flight
        empty = voc.open_stream("A", ref)
        empty.finish()
        assert [a async for a in empty.audio()] == []
    finally:
        await voc.close()
    with pytest.raises(EngineUnavailableError):
        async for _ in waiting.audio():
            pass
    with pytest.raises(EngineUnavailableError):
        voc.open_stream("A", ref)


async def test_stage_timer_times_each_part_and_changes_nothing(s3gen, ref) -> None:
    from gateway.engine.vllm.s3gen_batch import StageTimer

    vocoder = _vocoder(s3gen)
    assert vocoder.batch.timer is None  # serving never synchronises for timing
    await vocoder.start()
    try:
        plain = await vocoder.vocode("a", ref, _tokens(14, 3))
        timer = vocoder.batch.timer = StageTimer("cpu")
        timed = await vocoder.vocode("a", ref, _tokens(14, 3))
    finally:
        await vocoder.close()
    np.testing.assert_array_equal(plain, timed)
    assert set(timer.seconds) == {"flow encoder", "CFM inputs", "CFM decoder", "HiFT", "host copy"}
    assert all(s > 0 for s in timer.seconds.values())


async def test_a_dead_loop_ends_open_streams_at_once_and_turns_health_red(s3gen, ref) -> None:
    voc = _vocoder(s3gen)
    await voc.start()
    try:
        voc.check_health()
        stream = voc.open_stream("A", ref)

        def broken():
            raise RuntimeError("boom")

        voc.plan_batch = broken  # the loop's own code fails (not a batch): the loop task dies
        stream.push(_tokens(9, 1))
        with pytest.raises(EngineUnavailableError, match="boom"):
            await asyncio.wait_for(anext(stream.audio()), timeout=2)
        with pytest.raises(EngineUnavailableError, match="died"):
            voc.check_health()
        with pytest.raises(EngineUnavailableError):
            voc.open_stream("A", ref)
    finally:
        await voc.close()


@pytest.mark.slow
async def test_batches_failing_in_a_row_turn_health_red_until_one_succeeds(s3gen, ref) -> None:
    voc = _vocoder(s3gen, vocoder_unhealthy_after_failures=2)
    await voc.start()
    real = voc.launch_batch

    def sticky_fault(jobs, refs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    try:
        voc.launch_batch = sticky_fault
        for i in range(2):
            voc.check_health()
            with pytest.raises(EngineError):
                await voc.vocode("A", ref, _tokens(8, i))
        with pytest.raises(EngineUnavailableError, match="2 batches failed"):
            voc.check_health()
        voc.launch_batch = real
        assert (await voc.vocode("A", ref, _tokens(8, 3))).size > 0
        voc.check_health()
    finally:
        await voc.close()


def _playing_and_fresh(voc: Vocoder, ref) -> tuple:
    """A stream whose later window is ready (its first was delivered) and a new stream whose
    first window is, opened in that order."""
    playing = voc.open_stream("A", ref)
    playing.push(_tokens(40, 1))
    playing._index, playing._committed = 1, 6  # history: its first window was delivered
    fresh = voc.open_stream("A", ref)
    fresh.push(_tokens(9, 2))
    return playing, fresh


async def test_later_windows_that_waited_too_long_go_ahead_of_first_windows(s3gen, ref) -> None:
    voc = _vocoder(s3gen, vocoder_max_batch=1, vocoder_max_later_wait_s=0.5)
    await voc.start()  # the loop task does not run before this test awaits: it plans by hand
    try:
        playing, fresh = _playing_and_fresh(voc, ref)
        assert [s for s, _ in voc.plan_batch(now=100.0)] == [fresh], "first windows first..."
        assert [s for s, _ in voc.plan_batch(now=100.6)] == [playing], "...but not past the wait bound"
    finally:
        await voc.close()


async def test_first_windows_apart_take_a_batch_of_their_own(s3gen, ref) -> None:
    """``vocoder_first_apart``: a batch with a stream's small first window takes no later
    window whose listener can still wait (under load it would make the first byte wait for a
    big solve), however long that window has waited (under load all have waited past the
    aging bound: a GPU run where they all joined gained nothing); a later window whose
    listener would go silent joins; and a one-shot request's window (no first byte to
    hurry) splits nothing."""
    from gateway.engine.base import SAMPLE_RATE

    def plan(voc: Vocoder, now: float) -> list:
        return [s for s, _ in voc.plan_batch(now=now)]

    for apart in (False, True):
        voc = _vocoder(s3gen, vocoder_first_apart=apart, vocoder_max_later_wait_s=0.5)
        await voc.start()  # the loop task does not run before this test awaits: it plans by hand
        try:
            playing, fresh = _playing_and_fresh(voc, ref)
            # the playing stream's listener started at 99.0 with 3 s delivered; the vocoder's
            # windows lately took 0.8 s each, so below 0.8 s left it would go silent
            playing._first_audio_at = 99.0
            playing._seam.samples_emitted = 3 * SAMPLE_RATE
            voc._window_latency_s = 0.8
            if not apart:
                assert plan(voc, 100.0) == [fresh, playing], "one batch: the first window rides with the rest"
                continue
            assert plan(voc, 100.0) == [fresh], "apart: the first window alone (2 s left to hear)"
            assert plan(voc, 100.9) == [fresh], "waited past the aging bound, but 1.1 s left: it waits"
            assert set(plan(voc, 101.3)) == {fresh, playing}, "0.7 s left: it would go silent, so it joins"
            playing._first_audio_at = None
            assert set(plan(voc, 100.0)) == {fresh, playing}, "a stream not yet heard: urgent"
            playing._first_audio_at = 99.0
            (taken,) = [w for s, w in voc.plan_batch(now=100.1) if s is fresh]
            fresh.take(taken)
            assert plan(voc, 100.2) == [playing], "no first window left: the later ones go"
            whole = voc.open_stream("A", ref, one_shot=True)
            whole.push(_tokens(9, 3))
            whole.finish()
            assert plan(voc, 100.3) == [whole, playing], "a one-shot request's window is no first byte"
        finally:
            await voc.close()


async def test_streams_with_first_windows_apart_come_out_whole(s3gen, ref) -> None:
    """Through the loop with ``vocoder_first_apart``: streams opened one after another (so
    first windows meet later ones) all end, each with its every token vocoded."""
    voc = _vocoder(s3gen, vocoder_first_apart=True)
    await voc.start()
    try:
        streams = []
        for i in range(3):
            stream = voc.open_stream("A", ref)
            stream.push(_tokens(27, 20 + i))
            stream.finish()
            streams.append(stream)
            await asyncio.sleep(0.05)

        async def counts(stream) -> list[int]:
            return [n async for _, n in stream.chunks()]

        done = await asyncio.wait_for(asyncio.gather(*[counts(s) for s in streams]), 300)
    finally:
        await voc.close()
    assert all(c and c[-1] == 27 and c[0] == POLICY.first_tokens for c in done), done


async def test_each_chunk_carries_the_token_count_of_its_own_window(s3gen, ref) -> None:
    """The count must travel with the samples: reading it from the stream after an await
    could include the next window's tokens."""
    voc = _vocoder(s3gen)
    await voc.start()
    try:
        stream = voc.open_stream("A", ref)
        stream.push(_tokens(27, 4))
        stream.finish()
        await asyncio.sleep(0)
        while voc.open_streams:  # let every window be delivered before reading any
            await asyncio.sleep(0.05)
        counts = [n async for _, n in stream.chunks()]
    finally:
        await voc.close()
    assert len(counts) > 1 and counts == sorted(counts) and counts[-1] == 27
    assert counts[0] == POLICY.first_tokens


def test_a_bf16_vocoder_leaves_voice_preparation_in_fp32(s3gen) -> None:
    """Seen on the GPU: the vocoder cast the shared S3Gen's flow to bf16 in place, and every
    clip voice then failed in ``embed_ref`` (it runs in the flow's dtype; no bf16 FFT)."""
    from gateway.engine.vllm.vocoder import with_own_flow

    s3gen.float()
    voc = Vocoder(with_own_flow(s3gen), load_settings({}, {"flow_steps": 1, "max_speech_tokens": 64}),
                  policy=POLICY, flow_dtype=torch.bfloat16)
    assert voc.batch.flow.encoder_proj.weight.dtype == torch.bfloat16
    assert s3gen.dtype == torch.float32
    ref = parity_vocoder.reference_dict(s3gen, 12, 150.0, 1)  # embed_ref on the shared S3Gen
    assert ref["prompt_feat"].dtype == torch.float32


async def _stream_audio(voc: Vocoder, ref, token_lists: list[list[int]]) -> list[np.ndarray]:
    """Each token list into its own stream: a first window's tokens, then (once every stream's
    first audio is out) the rest at once, so the windows do not depend on timing (the rest
    goes as the final windows that ``POLICY`` allows); their audio."""
    first = POLICY.first_tokens + POLICY.lookahead
    await voc.start()
    try:
        streams = [voc.open_stream("A", ref) for _ in token_lists]
        chunks = [s.audio() for s in streams]
        for stream, tokens in zip(streams, token_lists):
            stream.push(tokens[:first])
        heads = await asyncio.gather(*[anext(c) for c in chunks])
        for stream, tokens in zip(streams, token_lists):
            stream.push(tokens[first:])
            stream.finish()

        async def rest(chunk):
            return [a async for a in chunk]

        tails = await asyncio.gather(*[rest(c) for c in chunks])
        return [np.concatenate([head, *tail]) for head, tail in zip(heads, tails)]
    finally:
        await voc.close()


@pytest.mark.slow
async def test_a_first_window_lane_runs_the_first_windows_and_changes_no_sample(s3gen, ref) -> None:
    """``vocoder_first_window_lane_rows``: every stream's first window runs in the lane's
    batches (at most its rows each), every later one in the main loop's, and the audio is
    what one loop makes (same windows, same noise, same solves; batch composition only moves
    roundings)."""
    tokens = [_tokens(n, 10 + i) for i, n in enumerate((22, 17, 9))]
    alone = await _stream_audio(_vocoder(s3gen), ref, tokens)
    voc = _vocoder(s3gen, vocoder_first_window_lane_rows=2)
    lane = voc.first_lane
    assert lane is not None and lane.lane and lane.max_batch_rows == 2 and lane.stats is voc.stats
    ran: dict[str, list[list[int]]] = {"main": [], "lane": []}
    for name, loop in (("main", voc), ("lane", lane)):
        def recording(jobs, refs, pause_t3=False, _launch=loop.launch_batch, _name=name):
            ran[_name].append([job.window.index for job in jobs])
            return _launch(jobs, refs, pause_t3)

        loop.launch_batch = recording
    laned = await _stream_audio(voc, ref, tokens)
    assert sorted(i for batch in ran["lane"] for i in batch) == [0, 0, 0]
    assert all(len(batch) <= 2 for batch in ran["lane"])
    assert ran["main"] and all(i > 0 for batch in ran["main"] for i in batch)
    for a, b in zip(alone, laned):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=1e-4)
    assert voc.stats.first_window_rows == 3 and voc.stats.rows == sum(map(len, ran["main"] + ran["lane"]))


@pytest.mark.slow
async def test_preempting_lane_feeds_the_main_loops_solves_a_step_at_a_time_and_changes_no_sample(s3gen, ref) -> None:
    """``vocoder_first_window_preempt``: the main loop's batches are queued one Euler step per
    call of ``feed`` (the launch lock free between calls, for the lane), the first windows run
    in the lane, and the audio is what one loop makes."""
    tokens = [_tokens(n, 10 + i) for i, n in enumerate((22, 17, 9))]
    alone = await _stream_audio(_vocoder(s3gen, flow_steps=3), ref, tokens)
    voc = _vocoder(s3gen, flow_steps=3, vocoder_first_window_lane_rows=2, vocoder_first_window_preempt=True)
    assert voc.preempt and not voc.first_lane.preempt
    fed: list[tuple[str, bool]] = []
    feed = voc.feed

    def counting(feeding):
        fed.append((type(out := feed(feeding)).__name__, voc._launch_lock.locked()))
        return out

    voc.feed = counting
    laned = await _stream_audio(voc, ref, tokens)
    launches = sum(name == "_Launched" for name, _ in fed)
    assert launches >= 1 and len(fed) == 3 * launches, "per batch: two steps yield, the third ends the launch"
    assert not any(locked for _, locked in fed), "the lane may launch between two steps"
    for a, b in zip(alone, laned):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_a_lane_batch_is_what_the_preempting_main_loops_next_steps_wait_for(s3gen) -> None:
    voc = _vocoder(s3gen, vocoder_first_window_lane_rows=2, vocoder_first_window_preempt=True)
    queued = SimpleNamespace(copy=SimpleNamespace(event="lane batch copied", done=lambda: True))
    voc.first_lane._launched(queued, pause_t3=False)
    assert voc._lane_event == "lane batch copied"
    plain = _vocoder(s3gen, vocoder_first_window_lane_rows=2)
    plain.first_lane._launched(queued, pause_t3=False)
    assert plain._lane_event is None, "without preemption no one waits for the lane"
    with pytest.raises(ValueError, match="vocoder_first_window_lane_rows"):
        _vocoder(s3gen, vocoder_first_window_preempt=True)


async def test_the_first_window_lane_starts_closes_and_reports_health_with_its_loop(s3gen, ref) -> None:
    voc = _vocoder(s3gen, vocoder_first_window_lane_rows=4)
    lane = voc.first_lane
    await voc.start()
    try:
        voc.check_health()
        assert lane._task is not None and lane._executor is not None
        lane._failed_batches = voc.settings.vocoder_unhealthy_after_failures  # the lane's batches keep failing
        with pytest.raises(EngineUnavailableError, match="batches failed"):
            voc.check_health()
        lane._failed_batches = 0
    finally:
        await voc.close()
    assert lane._task is None and lane._executor is None


def test_the_first_window_lane_takes_only_streamed_first_windows_within_its_graphs(s3gen) -> None:
    """The lane plans a stream's first window whose flow input fits its graphs; the main loop
    everything else: later windows, whole utterances, first windows grown past the lane's
    widest graph."""
    from types import SimpleNamespace

    voc = _vocoder(s3gen, vocoder_first_window_lane_rows=4)
    lane = voc.first_lane

    def stream(one_shot: bool = False) -> SimpleNamespace:
        return SimpleNamespace(one_shot=one_shot, cost_tokens=lambda window: window.cost)

    def window(index: int, cost: int) -> SimpleNamespace:
        return SimpleNamespace(index=index, cost=cost)

    widest = lane.first_window_top() // 2  # tokens
    cases = [(stream(), window(0, 30), True), (stream(), window(1, 30), False),
             (stream(one_shot=True), window(0, 30), False), (stream(), window(0, widest), True),
             (stream(), window(0, widest + 1), False)]
    for s, w, in_lane in cases:
        assert lane.lane_takes(s, w) is in_lane and lane._plans(s, w) is in_lane
        assert voc._plans(s, w) is not in_lane
    plain = _vocoder(s3gen)
    assert plain.first_lane is None and all(plain._plans(s, w) for s, w, _ in cases)


async def test_a_saturated_first_window_lane_leaves_its_overflow_to_the_main_loop(s3gen) -> None:
    """A burst of new streams: the lane takes first windows up to its rows per batch and its
    batches in flight; once it can launch no more (saturated), the main loop plans the first
    windows still waiting instead of leaving them to queue for the lane's next batches (on an
    H100 a lane of 8 rows made a 32-stream burst's first audio 1206 ms against 867 in one batch),
    and the lane's wake-up when it saturates tells the main loop to look."""
    from gateway.engine.vllm.vocoder_stream import VocoderStream

    voc = _vocoder(s3gen, vocoder_first_window_lane_rows=1)
    lane = voc.first_lane
    streams = [VocoderStream(voc, "v", {}, False) for _ in range(4)]
    for i, stream in enumerate(streams):
        voc._streams.add(stream)
        stream.push(_tokens(POLICY.first_tokens + POLICY.lookahead, 40 + i))  # a first window each
    assert not voc.plan_batch(), "the lane has room: its first windows are not the main loop's"
    for _ in range(lane.pipeline_depth):  # the lane launches batches of its one row until full
        (taken,) = lane.plan_batch()
        taken[0].take(taken[1])
        lane._in_flight.append(taken)  # as the lane's loop holds a launched batch
    assert lane.saturated
    overflow = voc.plan_batch()
    assert sorted(id(s) for s, _ in overflow) == sorted(id(s) for s in streams[lane.pipeline_depth:])
    assert all(w.index == 0 for _, w in overflow)
    lane._in_flight.clear()
    assert not lane.saturated and not voc.plan_batch(), "room again: first windows back to the lane"
    assert lane._on_saturated == voc._wake.set and voc._on_saturated is None


def test_the_first_window_lane_is_refused_with_a_compiled_estimator() -> None:
    from gateway.settings import SettingsError

    assert load_settings({}, {"vocoder_first_window_lane_rows": 8}).vocoder_first_window_lane_rows == 8
    with pytest.raises(SettingsError, match="vocoder_first_window_lane_rows"):
        load_settings({}, {"vocoder_first_window_lane_rows": 8, "vocoder_compile": "dynamic"})


def test_the_two_loops_launch_their_batches_one_at_a_time(s3gen) -> None:
    """S3Gen's eager modules keep caches (the flow encoder's positional encodings) that two
    threads must not grow at once: the lane's worker and the main loop's take one lock to
    launch (the device still runs their work side by side)."""
    import threading

    voc = _vocoder(s3gen, vocoder_first_window_lane_rows=2)
    active, most = [0], [0]

    def launch(jobs, refs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)
        active[0] -= 1
        return "launched"

    voc._launch_batch = voc.first_lane._launch_batch = launch
    threads = [threading.Thread(target=loop.launch_batch, args=([], {})) for loop in (voc, voc.first_lane) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
