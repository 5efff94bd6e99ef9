"""The vocoder's speed work, on the real S3Gen (random weights, tiny sizes, CPU): a batch is
launched without reading anything back from the device, batches in flight overlap without
changing any audio, the first-window step count and the voice-prompt length change only
what they say, and a traced stream's first window shows every vocoder stage."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from gateway.engine.vllm import s3gen_batch
from gateway.engine.vllm.cfm_solver import GraphBuckets
from gateway.engine.vllm.s3gen_batch import FlowRow, NoiseTapes, S3GenBatch, width_groups
from gateway.engine.vllm.vocoder import Vocoder
from gateway.engine.vllm.vocoder_stream import WindowJob
from gateway.engine.vllm.vocoder_windows import WindowPolicy
from gateway.observability.timeline import Timeline
from gateway.settings import load_settings
from gateway.tools import parity_vocoder

POLICY = WindowPolicy(first_tokens=6, tokens=8, left_context=4, final_merge_tokens=8)


@pytest.fixture(scope="module")
def ref(s3gen):
    s3gen.float()
    return parity_vocoder.reference_dict(s3gen, 12, 120.0, 0)


def _vocoder(s3gen, pipeline_depth: int = 2, **settings) -> Vocoder:
    base = {"flow_steps": 2, "max_speech_tokens": 64}
    base.update(settings)
    return Vocoder(s3gen, load_settings({}, base), policy=POLICY, pipeline_depth=pipeline_depth)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextlib.contextmanager
def no_host_reads():
    """Fail on anything that makes the host wait for a device: reading values back
    (``item``, ``tolist``, ``cpu``, ``numpy``, a tensor's truth value or number) or a
    pageable upload (``torch.tensor``/``as_tensor`` straight onto a ``device``). On the CPU
    these are harmless, so the check is of the code's pattern, which is what runs on a GPU."""
    seen: list[str] = []
    patched = []

    def forbid(owner, name):
        real = getattr(owner, name)

        def guard(*args, **kwargs):
            if name in ("tensor", "as_tensor") and kwargs.get("device") is None:
                return real(*args, **kwargs)
            seen.append(name)
            return real(*args, **kwargs)

        patched.append((owner, name, real))
        setattr(owner, name, guard)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        forbid(torch.Tensor, name)
    forbid(torch, "tensor")
    forbid(torch, "as_tensor")
    try:
        yield seen
    finally:
        for owner, name, real in reversed(patched):
            setattr(owner, name, real)


async def test_a_batch_is_launched_without_waiting_on_the_device(s3gen, ref) -> None:
    voc = _vocoder(s3gen)
    await voc.start()
    try:
        await voc.vocode("A", ref, _tokens(9, 0))  # the voice is prepared (once, not per batch)
        streams = [voc.open_stream("A", ref) for _ in range(3)]
        for i, stream in enumerate(streams):
            stream.push(_tokens(12 + 5 * i, i + 1))
        chosen = voc.plan_batch()
        assert len(chosen) == 3
        jobs: list[WindowJob] = [stream.take(window) for stream, window in chosen]
        refs = {"A": ref}
        with no_host_reads() as seen:
            launched = voc.launch_batch(jobs, refs)
        assert seen == [], f"the launch read from the device: {seen}"
        with no_host_reads() as seen:
            voc.batch.tapes.hift_noise([0, 480], 16)  # what the launch used to do: a pageable upload
        assert seen == ["tensor"], "the guard sees what it forbids"
        outcomes = voc.finish_batch(launched)
        again = voc.finish_batch(voc.launch_batch(jobs, refs))
        for got, expected in zip(outcomes, again):
            np.testing.assert_array_equal(got.audio, expected.audio)
            assert got.audio.size == (got.hift_frames * 480)
        for job, outcome in zip(jobs, outcomes):
            job.stream.deliver(job, outcome)
    finally:
        await voc.close()


async def _streams_audio(voc: Vocoder, ref, utterances: list[list[int]]) -> list[np.ndarray]:
    streams = [voc.open_stream("A", ref) for _ in utterances]

    async def produce(stream, tokens):
        for i in range(0, len(tokens), 4):
            stream.push(tokens[i:i + 4])
            await asyncio.sleep(0)
        stream.finish()

    async def consume(stream):
        return np.concatenate([a async for a in stream.audio()])

    results = await asyncio.gather(*[produce(s, t) for s, t in zip(streams, utterances)],
                                   *[consume(s) for s in streams])
    return list(results[len(utterances):])


@pytest.mark.slow
async def test_batches_in_flight_together_change_no_audio(s3gen, ref) -> None:
    utterances = [_tokens(n, 10 + i) for i, n in enumerate((25, 18, 31, 9))]
    outputs = {}
    for depth in (1, 2):
        voc = _vocoder(s3gen, pipeline_depth=depth)
        await voc.start()
        try:
            outputs[depth] = await _streams_audio(voc, ref, utterances)
        finally:
            await voc.close()
        assert voc.stats.device_busy_s > 0 and voc.stats.busy_s > 0
    for a, b, tokens in zip(outputs[1], outputs[2], utterances):
        assert a.shape == b.shape == (len(tokens) * 960,)
        np.testing.assert_array_equal(a, b)


def _batch(s3gen, **kwargs) -> S3GenBatch:
    s3gen.float()
    tapes = NoiseTapes.generate(0, flow_frames=400, hift_samples=200 * 480, harmonics=9, device="cpu")
    return S3GenBatch(s3gen, device="cpu", flow_dtype=torch.float32, flow_steps=2, tapes=tapes, **kwargs)


def test_first_window_steps_change_only_first_windows(s3gen, ref) -> None:
    plain, fewer = _batch(s3gen), _batch(s3gen, first_window_steps=1)
    assert plain.first_cfm is plain.cfm and fewer.first_cfm.steps == 1 and fewer.cfm.steps == 2
    voice = plain.prepare_voice(ref)
    tokens = _tokens(12, 3)
    rows = [FlowRow(voice, tokens, 0, 9, False, first=True), FlowRow(voice, tokens, 0, 9, False)]
    base, changed = plain.run_flow(rows), fewer.run_flow(rows)
    torch.testing.assert_close(changed[1], base[1], rtol=1e-5, atol=1e-5)  # later windows: as before
    assert not torch.allclose(changed[0], base[0], atol=1e-3), "the first window got its own steps"
    one_step = _batch(s3gen, first_window_steps=1)
    one_step.cfm = one_step.first_cfm
    torch.testing.assert_close(changed[0], one_step.run_flow([rows[1]])[0], rtol=1e-5, atol=1e-5)


async def test_a_stream_finished_before_its_first_window_is_vocoded_whole_as_one_shot(s3gen, ref) -> None:
    """Under load T3 finishes utterances before the vocoder gets to them: such a stream is one
    window (the flow over the voice prompt once, not once per window), its audio the one-shot
    computation's, and the first window's own step count (a first-byte knob) does not touch it."""
    tokens = _tokens(15, 21)  # more than twice the first window, within the final limit (2 x 8)
    policy = WindowPolicy(first_tokens=6, tokens=8, left_context=4)  # final limit: twice the cap, 16
    voc = Vocoder(s3gen, load_settings({}, {"flow_steps": 2, "max_speech_tokens": 64,
                                            "vocoder_first_window_flow_steps": 1}), policy=policy)
    await voc.start()
    try:
        stream = voc.open_stream("A", ref)
        stream.push(tokens)
        stream.finish()
        chunks = [a async for a in stream.audio()]
        one_shot = await voc.vocode("A", ref, tokens)
        arriving = voc.open_stream("A", ref)  # the same tokens still arriving: a small first window
        arriving.push(tokens[:9])
        audio = arriving.audio()
        first = await audio.__anext__()
        arriving.push(tokens[9:])
        arriving.finish()
        rest = [a async for a in audio]
    finally:
        await voc.close()
    assert len(chunks) == 1 and voc.stats.batches == 4
    np.testing.assert_array_equal(chunks[0], one_shot)
    assert first.size == 6 * 960 - 8 * 480 and len(rest) >= 1  # 6 tokens, less the seam's held samples
    assert np.concatenate([first, *rest]).size == one_shot.size


def test_width_groups_split_only_into_solves_of_enough_rows() -> None:
    ladder = (512, 640, 800, 1024)
    narrow, wide = [546] * 8, [1000] * 8
    assert width_groups(narrow + wide, ladder, 8) == [list(range(8)), list(range(8, 16))]
    assert width_groups(narrow + wide, ladder, 0) == [list(range(16))]  # off
    assert width_groups(narrow + wide, ladder, 9) == [list(range(16))]  # too few rows to split
    # a small narrow group joins the next wider one; a small widest group stays alone
    frames = [500] * 3 + [600] * 6 + [1000] * 9 + [2000] * 2
    assert width_groups(frames, ladder, 8) == [list(range(9)), list(range(9, 18)), [18, 19]]
    # rows in any order, grouped by the ladder's step that holds each
    mixed = [1000, 546, 1000, 546] * 4
    assert width_groups(mixed, ladder, 8) == [[1, 3, 5, 7, 9, 11, 13, 15], [0, 2, 4, 6, 8, 10, 12, 14]]
    assert width_groups([], ladder, 8) == []


def test_a_batch_split_by_width_gives_every_row_what_one_solve_gives(s3gen, ref, monkeypatch) -> None:
    """Small first windows beside whole utterances: solved as two solves (each at its own
    width) the rows are what one padded solve makes of them; the narrow rows are solved at
    their own width."""
    monkeypatch.setattr(s3gen_batch, "DEFAULT_LADDER", (48, 96, 192))  # tiny sizes' steps
    one, split = _batch(s3gen, split_min_rows=0), _batch(s3gen, split_min_rows=2)
    voice = one.prepare_voice(ref)
    rows = [FlowRow(voice, _tokens(9, 30 + i), 0, 6, False, first=True) for i in range(2)]
    rows += [FlowRow(voice, _tokens(60, 40 + i), 0, 60, True) for i in range(2)]
    rows = [rows[0], rows[2], rows[1], rows[3]]  # interleaved, as a batch plans them
    widths: list[int] = []
    real = split.cfm.solve_stepwise
    split.cfm.solve_stepwise = lambda noise, *a: widths.append(int(noise.shape[2])) or real(noise, *a)  # type: ignore[method-assign]
    base, parts = one.run_flow(rows), split.run_flow(rows)
    assert widths == [2 * (12 + 9 - 3), 2 * (12 + 60)]  # narrow rows alone, at their own width (lookahead dropped)
    for a, b in zip(base, parts):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_split_that_graph_padding_makes_dearer_is_not_made(s3gen, ref) -> None:
    """Graph buckets pad rows to powers of two, so a split can compute more than one solve:
    3 narrow rows (a 4-row graph) beside 1 wide row are no cheaper split than as one 4-row
    solve; 2 + 2 rows of very different widths are. The batch takes whichever computes less
    (one cost search over runs in width order, :func:`row_chunks`), unless splitting by width
    is off."""
    batch = _batch(s3gen, split_min_rows=1)
    voice = batch.prepare_voice(ref)
    widths: list[int] = []
    real = batch.cfm.solve_stepwise
    batch.cfm.solve_stepwise = lambda noise, *a: widths.append(int(noise.shape[0])) or real(noise, *a)  # type: ignore[method-assign]
    # buckets as captured graphs would give (rows 1, 2, 4; frames 32 to 256), none captured: eager
    batch.cfm.buckets = GraphBuckets(rows=(1, 2, 4), frames=(32, 48, 64, 128, 256), max_cells=1 << 20)
    near = [FlowRow(voice, _tokens(13, i), 0, 10, False) for i in range(3)] + [FlowRow(voice, _tokens(20, 9), 0, 20, True)]
    batch.run_flow(near)  # 3 x 2(12+10)=44 -> 48 (4-row graph: 192) + 1 x 64 = 256 > one 4 x 64 = 256: not split
    assert widths == [4]
    widths.clear()
    far = [FlowRow(voice, _tokens(13, i), 0, 10, False) for i in range(2)] + [
        FlowRow(voice, _tokens(100, 7 + i), 0, 100, True) for i in range(2)]
    batch.run_flow(far)  # 2 x 48 + 2 x 256 = 608 < 4 x 256 = 1024: split
    assert sorted(widths) == [2, 2]
    widths.clear()
    batch.split_min_rows = 0  # off: every run at the widest width, so one 4-row graph
    batch.run_flow(far)
    assert widths == [4]


def test_prompt_tokens_keep_the_end_of_the_voice_prompt(s3gen, ref) -> None:
    full = _batch(s3gen).prepare_voice(ref)
    short = _batch(s3gen, prompt_tokens=5).prepare_voice(ref)
    assert full.prompt_len == 12 and short.prompt_len == 5
    assert torch.equal(short.prompt_tokens, full.prompt_tokens[-5:])
    assert torch.equal(short.prompt_feat, full.prompt_feat[:, -10:])
    assert torch.equal(short.speaker, full.speaker)
    assert _batch(s3gen, prompt_tokens=50).prepare_voice(ref).prompt_len == 12


async def test_a_traced_stream_marks_every_vocoder_stage_of_its_first_window(s3gen, ref) -> None:
    voc = _vocoder(s3gen)
    await voc.start()
    trace = Timeline()
    try:
        stream = voc.open_stream("A", ref, trace=trace)
        stream.push(_tokens(4, 1))
        stream.push(_tokens(6, 2))
        audio = [a async for a in _first_then_finish(stream)]
    finally:
        await voc.close()
    assert audio
    stages = [name for name, _, _ in trace.rows()]
    expected = ["t3 tokens: 4", "t3 tokens: 10", "vocoder window ready", "vocoder batch launched",
                "vocoder: flow encoder", "vocoder: CFM", "vocoder: HiFT", "vocoder: host copy",
                "vocoder audio delivered"]
    at = [next(i for i, s in enumerate(stages) if s.startswith(e)) for e in expected]
    assert at == sorted(at), stages
    assert sum(s.startswith("vocoder audio delivered") for s in stages) == 1, "first window only"


async def _first_then_finish(stream):
    async for samples in stream.audio():
        yield samples
        if not stream.closed:
            stream.finish()
