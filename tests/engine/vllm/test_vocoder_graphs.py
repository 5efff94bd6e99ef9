"""The flow encoder and HiFT made capturable as CUDA graphs (CPU side): HiFT's decode without
host synchronisation computes upstream's, the rows a graph bucket pads a batch with change no
real row's output, every non-final window's HiFT length is a captured shape, and a bucket is
found only where one was captured. Graph == eager itself is measured on the GPU
(``python -m gateway.tools.parity_families --skip-t3``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gateway.engine.vllm.graph_calls import GraphCalls
from gateway.engine.vllm.hift_decode import hift_decode, istft, spectra_on_device, stft, window_on_device
from gateway.engine.vllm.s3gen_batch import FlowRow, HiftRow, NoiseTapes, S3GenBatch
from gateway.engine.vllm.cfm_solver import GraphBuckets
from gateway.engine.vllm.vocoder import (
    ENCODER_GRAPH_ATTENTION,
    HIFT_GRAPH_FRAMES,
    Vocoder,
    encoder_graph_shapes,
    hift_graph_shapes,
)
from gateway.engine.vllm.vocoder_windows import WindowPolicy
from gateway.settings import load_settings
from gateway.tools import parity_vocoder

POLICY = WindowPolicy(first_tokens=6, tokens=8, left_context=4, final_merge_tokens=8, max_tokens=16)


@pytest.fixture(scope="module")
def ref(s3gen):
    s3gen.float()
    return parity_vocoder.reference_dict(s3gen, 12, 120.0, 0)


def _batch(s3gen) -> S3GenBatch:
    s3gen.float()
    tapes = NoiseTapes.generate(0, flow_frames=400, hift_samples=200 * 480, harmonics=9, device="cpu")
    return S3GenBatch(s3gen, device="cpu", flow_dtype=torch.float32, flow_steps=2, tapes=tapes)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hann_spectra(n_fft: int = 16, hop: int = 4):
    return spectra_on_device(SimpleNamespace(stft_window=torch.hann_window(n_fft, periodic=True),
                                             istft_params={"n_fft": n_fft, "hop_len": hop}), "cpu")


@pytest.mark.parametrize("samples", [40, 57, 4801])
def test_stft_is_torch_stft(samples: int) -> None:
    spectra = _hann_spectra()
    signal = torch.randn(3, samples, generator=torch.Generator().manual_seed(samples))
    expected = torch.view_as_real(torch.stft(signal, 16, 4, 16, window=spectra.window, return_complex=True))
    got = stft(signal, spectra)
    assert got.shape == (3, 18, 1 + samples // 4)
    torch.testing.assert_close(got, torch.cat([expected[..., 0], expected[..., 1]], dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [2, 5, 37])
def test_istft_is_torch_istft(frames: int) -> None:
    spectra = _hann_spectra()
    g = torch.Generator().manual_seed(frames)
    real, imag = torch.randn(3, 9, frames, generator=g), torch.randn(3, 9, frames, generator=g)
    # torch.istft (irfft) takes no imaginary part at DC and Nyquist: neither may istft
    expected = torch.istft(torch.complex(real, imag), 16, 4, 16, window=spectra.window)
    got = istft(real, imag, spectra)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hift_decode_is_upstream_decode(s3gen) -> None:
    hift = s3gen.mel2wav.float()
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(2, 80, 12, generator=g)
    source = 0.1 * torch.randn(2, 1, 12 * 480, generator=g)
    with torch.inference_mode():
        expected = hift.decode(x=mel, s=source)
        got = hift_decode(hift, mel, source, spectra_on_device(hift, "cpu"))
    assert got.shape == expected.shape == (2, 12 * 480)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_window_that_breaks_the_overlap_add_condition_is_refused() -> None:
    # Non-zero at 2 of every 4 offsets: samples at the other two are covered by no frame.
    hift = SimpleNamespace(stft_window=torch.cat([torch.ones(2), torch.zeros(14)]),
                           istft_params={"n_fft": 16, "hop_len": 4})
    with pytest.raises(ValueError, match="overlap-add"):
        window_on_device(hift, "cpu")
    ok = SimpleNamespace(stft_window=torch.hann_window(16, periodic=True), istft_params={"n_fft": 16, "hop_len": 4})
    assert window_on_device(ok, "cpu").device.type == "cpu"


class _Ops(TorchDispatchMode):
    """The ATen ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_hift_batch_runs_no_fft(s3gen, ref) -> None:
    """No FFT in what HiFT's graphs capture: a captured cuFFT plan outlives its place in
    PyTorch's plan cache (evicted after 4096 other shapes, and destroyed), and the graph then
    replays on freed memory. Nor torch.istft, whose NOLA check reads a device value back (a
    stall per call on a GPU, and no CUDA graph can hold it)."""
    batch = _batch(s3gen)
    voice = batch.prepare_voice(ref)
    mel = batch.run_flow([FlowRow(voice, _tokens(9, 0), 0, 6, False)])[0]
    with _Ops() as ops:
        (wave, _), = batch.run_hift([HiftRow(mel, 0, None, 8)])
    assert wave.numel() == mel.shape[1] * 480
    assert {"aten.matmul.default", "aten.bmm.default"} & set(ops.names)  # the transforms: matrix products
    assert not [name for name in ops.names if "fft" in name or "stft" in name]
    assert batch.hift.stft_window.device == batch.device


def test_graph_buckets_are_found_only_where_captured() -> None:
    calls = GraphCalls("toy", lambda x: (x,))
    calls._rows = {100: [1, 4, 16]}  # what capture() records, without a GPU
    assert calls.fit(1, 100) == 1 and calls.fit(3, 100) == 4 and calls.fit(16, 100) == 16
    assert calls.fit(17, 100) is None and calls.fit(1, 99) is None
    x = torch.arange(6.0).reshape(3, 2)
    (out,) = calls.run(None, (x,), 2)  # not captured: eager, sliced to the real rows
    assert torch.equal(out, x[:2]) and calls.eager_runs == 1 and calls.replays == 0


def test_rows_a_graph_bucket_pads_with_change_no_real_row(s3gen, ref, monkeypatch) -> None:
    """A graph of 5 rows holding a batch of 3: the 2 extra rows (token 0 / silent mel) are
    computed and dropped, and the 3 real rows come out as they do unpadded. On the CPU the
    padded inputs run eagerly, which is the function the GPU captures."""
    batch = _batch(s3gen)
    voice = batch.prepare_voice(ref)
    rows = [FlowRow(voice, _tokens(9, 1), 0, 6, False), FlowRow(voice, _tokens(20, 2), 0, 20, True),
            FlowRow(voice, _tokens(13, 3), 4, 6, False)]
    mels = batch.run_flow(rows)
    hift_rows = [HiftRow(m[:, :12], 40 * i, None if i == 0 else torch.full((9,), 0.25), 4 * (i != 1))
                 for i, m in enumerate(mels)]
    waves = batch.run_hift(hift_rows)
    seen: list[tuple[str, int, int]] = []

    def padded_fit(self, rows: int, width: int) -> int:
        seen.append((self.name, rows, width))
        return rows + 2

    monkeypatch.setattr(GraphCalls, "fit", padded_fit)
    padded_mels = batch.run_flow(rows)
    padded_waves = batch.run_hift(hift_rows)
    assert {name for name, _, _ in seen} == {"flow encoder", "HiFT"}
    for a, b in zip(mels, padded_mels):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (wav, phase), (wav2, phase2) in zip(waves, padded_waves):
        torch.testing.assert_close(wav, wav2, rtol=1e-4, atol=1e-5)
        assert (phase is None) == (phase2 is None)
        if phase is not None:
            torch.testing.assert_close(phase, phase2)


def test_hift_graph_shapes_hold_every_window_but_final_ones(s3gen, ref) -> None:
    shapes = hift_graph_shapes(POLICY, 4)
    assert all(r * f <= HIFT_GRAPH_FRAMES for r, f in shapes)
    assert {r for r, _ in shapes} == {1, 2, 4}
    captured = {f for _, f in shapes}
    voc = Vocoder(s3gen, load_settings({}, {"flow_steps": 1, "max_speech_tokens": 96}), policy=POLICY)
    seen: list[tuple[int, int]] = []
    real = voc.batch._run_hift

    def record(rows):
        seen.extend((r.mel.shape[1], r.carry) for r in rows)
        return real(rows)

    voc.batch._run_hift = record

    async def stream(n: int) -> None:
        s = voc.open_stream("A", ref)

        async def produce() -> None:
            for i in range(0, n, 4):
                s.push(_tokens(n, n)[i:i + 4])
                await asyncio.sleep(0)
            s.finish()

        async def consume() -> int:
            return sum([a.size async for a in s.audio()])

        assert (await asyncio.gather(produce(), consume()))[1] == n * 960  # 2 mel frames of 480 samples a token

    async def main() -> None:
        await voc.start()
        try:
            await asyncio.gather(stream(70), stream(45))
        finally:
            await voc.close()

    asyncio.run(main())
    windows = [frames for frames, carry in seen if carry]  # carry 0: a final window
    assert len(windows) >= 4 and set(windows) <= captured, (sorted(set(windows)), sorted(captured))
    np.testing.assert_array_less(0, len(seen) - len(windows))  # and there were final ones


def test_a_window_carried_whole_hands_on_its_own_starting_phase(s3gen, ref) -> None:
    """When the next window re-vocodes all of this one's frames (a window shorter than the
    crossfade overlap), it starts where this one started: at this one's starting phase."""
    batch = _batch(s3gen)
    voice = batch.prepare_voice(ref)
    mel = batch.run_flow([FlowRow(voice, _tokens(9, 0), 0, 3, False)])[0]  # 6 frames
    start = torch.linspace(0.1, 0.9, 9)
    (_, whole), (_, part) = batch.run_hift([HiftRow(mel, 0, start, 6), HiftRow(mel, 0, start, 2)])
    torch.testing.assert_close(whole, start % 1)
    assert not torch.allclose(part, start % 1)


def test_encoder_graphs_take_the_cfm_buckets_within_the_attention_bound() -> None:
    """The served plan (64 rows, up to 1536 frames): the widths a batch's encoder runs at, each
    row bucket up to where (rows, frames^2) attention fits; first windows (~550-640 frames
    with a 10 s voice prompt) are captured at every row count up to 32."""
    cfm = GraphBuckets.plan(max_rows=64, max_frames=1536, min_frames=512, max_cells=65536).shapes()
    shapes = encoder_graph_shapes(cfm)
    assert all(r * (2 * w) ** 2 <= ENCODER_GRAPH_ATTENTION for r, w in shapes)
    assert {w for _, w in shapes} == {f // 2 for _, f in cfm}  # every width, at some row count
    assert (32, 320) in shapes and (64, 320) not in shapes and (64, 256) in shapes
    assert (1, 768) in shapes and (32, 768) not in shapes  # was in (14.4 GiB of graphs)


def test_the_cfm_graph_widths_fit_the_window_schedule_of_a_full_voice_prompt() -> None:
    """The geometric widths (512, 640, 800, 1024, ...) would solve a first window of a 10 s
    prompt (540 frames) at 640 and every regular window (650) at 800; the schedule's widths
    that they pad by more than 10% get graphs of their own, so a stream's windows but its last
    run within one 32-frame step of their width."""
    from gateway.engine.vllm.vocoder import SCHEDULE_PADDING, cfm_buckets, schedule_frames

    settings = load_settings({}, {})
    policy = WindowPolicy(first_tokens=20, tokens=50, max_tokens=200)
    assert schedule_frames(policy, 250) == [540, 650, 750, 950]
    buckets = cfm_buckets(policy, settings, max_rows=64, max_cells=65536)
    plain = GraphBuckets.plan(max_rows=64, max_frames=settings.vocoder_graph_max_frames, max_cells=65536)
    assert plain.frames_for(540) == 640 and plain.frames_for(650) == 800
    assert set(buckets.frames) - set(plain.frames) == {544, 672}
    for frames in schedule_frames(policy, 250):
        assert buckets.padding(frames) <= SCHEDULE_PADDING, (frames, buckets.frames_for(frames))
        assert buckets.fit(32, frames) is not None
    # a shorter prompt (vocoder_prompt_tokens) moves the widths with it
    short = load_settings({}, {"vocoder_prompt_tokens": 100})
    assert schedule_frames(policy, 100) == [240, 350, 450, 650]
    assert 672 in cfm_buckets(policy, short, max_rows=64, max_cells=65536).frames  # 650 -> 672, not 800
    # the first-window solver's ladder stops at a first window's width (lookahead included), which holds it
    first = cfm_buckets(policy, settings, max_rows=64, max_cells=65536, max_frames=546)
    assert first.frames == (512, 546) and first.padding(540) < 0.02


def test_the_batch_counts_the_cfm_frames_it_solves_and_the_padding_it_computes(s3gen, ref) -> None:
    """``cfm_frames`` counts the real rows' frames, ``cfm_solved_frames`` what the solves
    computed: each row at its group's width, and with graph buckets their rows and widths
    (the metrics' padding share: ``chatterbox_vocoder_cfm_solved_frames_total``)."""
    batch = _batch(s3gen)
    voice = batch.prepare_voice(ref)
    rows = [FlowRow(voice, _tokens(9, 1), 0, 6, False), FlowRow(voice, _tokens(20, 2), 0, 20, True),
            FlowRow(voice, _tokens(13, 3), 4, 6, False)]
    frames = [2 * (voice.prompt_len + len(r.tokens) - (0 if r.final else batch.lookahead)) for r in rows]
    batch.run_flow(rows)
    assert batch.cfm_frames == sum(frames)
    assert batch.cfm_solved_frames == 3 * max(frames), "one solve, every row at the widest's width"
    assert batch.cfm_eager_frames == sum(frames), "no graphs: every solve eager"
    assert max(frames) == 64
    batch.cfm.buckets = GraphBuckets(rows=(4,), frames=(48, 80), max_cells=1 << 20)  # as if captured
    batch.run_flow(rows)
    assert batch.cfm_frames == 2 * sum(frames)
    assert batch.cfm_solved_frames == 3 * 64 + 4 * 80, "a graph's 4 rows at its 80 frames"
    assert batch.cfm_eager_frames == sum(frames), "the graph held this solve"
    batch.cfm.buckets = GraphBuckets(rows=(4,), frames=(48,), max_cells=1 << 20)  # too narrow for 64
    batch.run_flow(rows)
    assert batch.cfm_eager_frames == 2 * sum(frames), "no graph holds 64 frames: eager again"


def test_the_batch_counts_the_hift_frames_no_graph_held(s3gen, ref) -> None:
    """``hift_eager_frames``: HiFT calls of a length no captured graph holds (final windows,
    filled ones; on the CPU every call), the metrics' ``vocoder_hift_eager_share``."""
    from types import SimpleNamespace

    batch = _batch(s3gen)
    voice = batch.prepare_voice(ref)
    mel = batch.run_flow([FlowRow(voice, _tokens(9, 0), 0, 6, False)])[0]
    frames = mel.shape[1]
    batch.run_hift([HiftRow(mel, 0, None, 0), HiftRow(mel, 0, None, 0)])
    assert (batch.hift_frames, batch.hift_eager_frames) == (2 * frames, 2 * frames), "no graphs: eager"
    graphs = batch.hift_graphs  # as if a graph of 4 rows of this length were captured
    graphs._rows[frames] = [4]
    graphs._graphs[(4, frames)] = SimpleNamespace(run=lambda inputs, rows: tuple(o[:rows] for o in graphs.fn(*inputs)))
    batch.run_hift([HiftRow(mel, 0, None, 0), HiftRow(mel, 0, None, 0)])
    assert (batch.hift_frames, batch.hift_eager_frames) == (4 * frames, 2 * frames), "the graph held it"


def test_row_chunks_cut_a_solve_where_the_graphs_row_counts_would_pad_it() -> None:
    """A graph's rows are powers of two: 35 rows would run as 64; cut as 32 + 3 they cost
    ~40% less (two replays). Runs follow width order, so a few wide rows do not widen the
    narrow ones' solve; without graphs (eager) nothing is padded and nothing is cut."""
    from gateway.engine.vllm.s3gen_batch import row_chunks

    buckets = GraphBuckets.plan(max_rows=64, max_frames=1536, max_cells=65536, extra_frames=(544, 672))
    runs = row_chunks(buckets, [650] * 35)
    assert sorted(len(r) for r in runs) == [3, 32] and sorted(p for r in runs for p in r) == list(range(35))
    assert row_chunks(buckets, [650] * 8) == [list(range(8))], "a full graph: one solve"
    assert len(row_chunks(buckets, [650] * 5)) == 1, "4 + 1 costs what 8 does: one solve"
    assert row_chunks(None, [650] * 35) == [list(range(35))]
    mixed = [950 if p % 7 == 0 else 540 for p in range(35)]  # 5 wide rows among 30 narrow ones
    runs = row_chunks(buckets, mixed)
    # the narrow rows as one 32-row graph at 544 frames, the wide ones in an 8-row graph at 1024
    # (which costs the same whatever rows fill it): not all 35 in a 64-row graph at 960
    assert len(runs) == 2 and {mixed[p] for p in runs[0]} == {540} and len(runs[1]) <= 8, runs
    assert [buckets.fit(len(r), max(mixed[p] for p in r)) for r in runs] == [(32, 544), (8, 1024)]
    # more rows than any graph holds: graph-sized runs, not one eager solve
    assert sorted(len(r) for r in row_chunks(buckets, [540] * 70)) == [6, 64]


def test_a_graph_is_warmed_up_and_captured_on_the_capture_stream_while_one_is_set(monkeypatch) -> None:
    """``vocoder_sms``: a CUDA graph keeps to the SMs of the context it was captured in, so
    the vocoder's graphs must be captured on its green context's stream; outside the block,
    PyTorch's own capture stream and a side stream for the warm-up, as before."""
    import contextlib

    from gateway.engine.vllm import graph_calls

    events: list = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: Stream) -> None:
            events.append(("wait", self.name, other.name))

    default = Stream("default")
    current = [default]

    @contextlib.contextmanager
    def on_stream(stream: Stream):
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        events.append(("capture", stream.name if stream is not None else "pytorch's"))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")

    def fn(x):
        events.append(("run", current[0].name))
        return x

    def captured(stream_name: str) -> list:
        return [("wait", stream_name, "default"), ("run", stream_name), ("wait", "default", stream_name),
                ("capture", "pytorch's" if stream_name == "side" else stream_name), ("run", "default")]

    x = torch.zeros(1)
    graph_calls.capture_graph(fn, [x], None)
    with graph_calls.capture_stream(Stream("green")):
        graph_calls.capture_graph(fn, [x], None)
    graph_calls.capture_graph(fn, [x], None)
    assert events == captured("side") + captured("green") + captured("side")


def test_the_vocoder_captures_every_graph_on_its_green_contexts_stream(s3gen) -> None:
    """The CFM (regular and first-window solvers), encoder and HiFT captures all happen with
    the green context's stream set, and none is left set afterwards."""
    from gateway.engine.vllm import graph_calls

    settings = load_settings({}, {"flow_steps": 2, "max_speech_tokens": 64, "vocoder_first_window_flow_steps": 1})
    voc = Vocoder(s3gen, settings, policy=POLICY)
    assert voc.batch.first_cfm is not voc.batch.cfm
    seen: list = []

    def recorder(name: str):
        def record(*args, **kwargs) -> float:
            seen.append((name, getattr(graph_calls._capture, "stream", None)))
            return 0.0
        return record

    voc.batch.cfm.capture = recorder("cfm")
    voc.batch.first_cfm.capture = recorder("first cfm")
    voc.batch.cfm.buckets = GraphBuckets.plan(max_rows=2, max_frames=64, min_frames=16)
    voc.batch.capture_encoder = recorder("encoder")
    voc.batch.capture_hift = recorder("hift")
    voc.green = SimpleNamespace(Stream=lambda: "green stream")
    voc._capture(4096)
    voc.green = None
    voc._capture(4096)
    assert seen == [("cfm", "green stream"), ("first cfm", "green stream"), ("encoder", "green stream"),
                    ("hift", "green stream"), ("cfm", None), ("first cfm", None), ("encoder", None), ("hift", None)]
    assert getattr(graph_calls._capture, "stream", None) is None
