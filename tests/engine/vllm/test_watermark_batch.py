"""The batched Perth watermark (gateway/engine/vllm/watermark_batch.py) against upstream's own
per-chunk call, on the CPU with Perth's real weights: chunks of different lengths, of equal
lengths, silence next to speech, and the batcher's callers from an event loop (answered each
with their own chunk, a cancelled one skipped, a failure reaching every caller)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from gateway.engine.vllm.watermark_batch import WatermarkBatcher, mark_batch

SR = 24000


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(90, 220)
    phase = np.cumsum(2 * np.pi * (f0 + 30 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)) / SR)
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 3) * t)) ** 2
    return (0.3 * x * env + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _snr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / max(((a - ref) ** 2).sum(), 1e-30)))


@pytest.fixture(scope="module")
def watermarker():
    perth = pytest.importorskip("perth")
    return perth.PerthImplicitWatermarker(device="cpu")


def _alone(watermarker, x: np.ndarray) -> np.ndarray:
    return np.asarray(watermarker.apply_watermark(x, sample_rate=SR), dtype=np.float32)


def test_a_batch_of_different_lengths_is_each_chunks_own_watermark(watermarker) -> None:
    chunks = [_speechlike(s, seed) for seed, s in enumerate((0.3, 1.1, 3.12, 0.77, 3.12, 2.0))]
    chunks.append(np.zeros(SR // 2, dtype=np.float32))  # silence: the mask keeps the mark out
    chunks.append(np.concatenate([np.zeros(SR // 4, np.float32), _speechlike(0.6, 9)]))
    with ThreadPoolExecutor(2) as pool:
        batched = mark_batch(watermarker, chunks, SR, pool)
    assert len(batched) == len(chunks)
    for x, got in zip(chunks, batched):
        want = _alone(watermarker, x)
        assert got.dtype == np.float32 and got.shape == want.shape
        if not np.any(want):
            assert not np.any(got)
            continue
        assert _snr(x, want) < 40  # the mark itself moves the signal, so equality below means something
        assert _snr(got, want) > 100, (len(x), _snr(got, want))


def test_the_longest_neighbour_does_not_reach_into_a_short_chunks_end(watermarker) -> None:
    """A short chunk's last frames are where zero padding and a neighbour's frames would
    differ: the same short chunk, batched beside a long one and alone, gives the same end."""
    short = _speechlike(0.5, 3)
    (beside_long, _) = mark_batch(watermarker, [short, _speechlike(4.0, 4)], SR)
    (alone,) = mark_batch(watermarker, [short], SR)
    tail = SR // 10
    assert _snr(beside_long[-tail:], alone[-tail:]) > 100


def test_a_chunk_alone_is_upstreams_own_call(watermarker, monkeypatch) -> None:
    x = _speechlike(0.4, 7)
    calls: list[int] = []
    original = type(watermarker).apply_watermark
    monkeypatch.setattr(type(watermarker), "apply_watermark",
                        lambda self, s, sample_rate: calls.append(s.size) or original(self, s, sample_rate=sample_rate))
    (got,) = mark_batch(watermarker, [x], SR)
    assert calls == [x.size] and got.dtype == np.float32
    assert np.array_equal(got, np.asarray(original(watermarker, x, sample_rate=SR), dtype=np.float32))
    mark_batch(watermarker, [x, _speechlike(0.5, 8)], SR)
    assert calls == [x.size]  # two chunks: the batched pass, no per-chunk call


def test_an_empty_batch_is_empty(watermarker) -> None:
    assert mark_batch(watermarker, [], SR) == []


async def test_the_batcher_answers_each_caller_with_its_own_chunk(watermarker) -> None:
    batcher = WatermarkBatcher(watermarker, SR, max_rows=8)
    try:
        chunks = [_speechlike(0.4 + 0.1 * i, 20 + i) for i in range(12)]
        results = await asyncio.gather(*(batcher.apply(c) for c in chunks))
        for x, got in zip(chunks, results):
            assert _snr(got, _alone(watermarker, x)) > 100
        assert batcher.rows == 12 and 2 <= batcher.batches <= 12  # at most max_rows at once
        # what the metrics export: the audio marked and the worker's time in passes
        assert batcher.audio_s == pytest.approx(sum(c.size for c in chunks) / SR)
        assert 0 < batcher.busy_s < 60
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.apply(chunks[0])


async def test_a_cancelled_caller_is_skipped_and_the_others_answered(watermarker) -> None:
    gate = asyncio.Event()
    seen: list[int] = []

    class Slow:  # the watermarker, slowed so that calls queue behind the first batch
        perth_net = watermarker.perth_net

        def __getattr__(self, name):
            return getattr(watermarker, name)

    batcher = WatermarkBatcher(Slow(), SR)
    original = batcher._mark

    def mark(items):
        seen.append(len(items))
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
        original(items)

    loop = asyncio.get_running_loop()
    batcher._mark = mark
    try:
        first = asyncio.create_task(batcher.apply(_speechlike(0.3, 1)))
        await asyncio.sleep(0.2)  # the worker holds the first batch at the gate
        leaving = asyncio.create_task(batcher.apply(_speechlike(0.3, 2)))
        staying = asyncio.create_task(batcher.apply(_speechlike(0.3, 3)))
        await asyncio.sleep(0.05)
        leaving.cancel()
        gate.set()
        assert (await first).size and (await staying).size
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert seen == [1, 1]  # the second batch held only the caller still waiting
    finally:
        batcher.close()


@pytest.mark.parametrize("first_apart", [True, False])
async def test_first_windows_go_in_a_pass_of_their_own_ahead_of_the_long_ones(watermarker, first_apart: bool) -> None:
    """``watermark_first_apart``: of what queued while a pass ran, the streams' first windows
    (short: their first audio waits for them) are marked in a pass of their own before the
    long windows queued with them, each still exactly its own watermark; without it, one
    pass takes them all."""
    gate = asyncio.Event()
    passes: list[list[bool]] = []
    answered: list[str] = []
    batcher = WatermarkBatcher(watermarker, SR, first_apart=first_apart)
    original = batcher._mark
    loop = asyncio.get_running_loop()

    def mark(items):
        passes.append([i.first for i in items])
        if len(passes) == 1:  # hold the first pass so that the rest queue behind it
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
        original(items)

    batcher._mark = mark

    async def call(name: str, x: np.ndarray, first: bool) -> np.ndarray:
        out = await batcher.apply(x, first=first)
        answered.append(name)
        return out

    try:
        held = asyncio.create_task(call("held", _speechlike(0.3, 70), False))
        await asyncio.sleep(0.2)  # the worker holds it at the gate
        long_ones = [_speechlike(2.0, 71 + i) for i in range(3)]
        firsts = [_speechlike(0.4, 75 + i) for i in range(2)]
        tasks = [asyncio.create_task(call(f"long{i}", x, False)) for i, x in enumerate(long_ones[:2])]
        tasks += [asyncio.create_task(call(f"first{i}", x, True)) for i, x in enumerate(firsts)]
        tasks.append(asyncio.create_task(call("long2", long_ones[2], False)))
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(held, *tasks)
        for x, got in zip([_speechlike(0.3, 70), *long_ones[:2], *firsts, long_ones[2]], results):
            assert _snr(got, _alone(watermarker, x)) > 100
        if first_apart:
            assert passes == [[False], [True, True], [False, False, False]]
            assert answered[1:3] == ["first0", "first1"]  # before any long window
        else:
            assert passes == [[False], [False, False, True, True, False]]
    finally:
        batcher.close()


async def test_a_failing_batch_fails_every_caller_of_it_and_the_batcher_goes_on(watermarker) -> None:
    class Broken:
        class perth_net:  # the attribute perth's watermarker has
            class hp:
                sample_rate = 32000

            @staticmethod
            def device():
                raise RuntimeError("device lost")

    batcher = WatermarkBatcher(Broken(), SR)
    try:
        results = await asyncio.gather(*(batcher.apply(_speechlike(0.2, i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results), results
    finally:
        batcher.close()
    good = WatermarkBatcher(watermarker, SR)
    try:
        assert (await good.apply(_speechlike(0.2, 7))).size
    finally:
        good.close()


async def test_a_pass_holds_at_most_its_seconds_of_audio_and_a_longer_chunk_goes_alone(watermarker) -> None:
    batcher = WatermarkBatcher(watermarker, SR, max_batch_s=0.5)
    sizes: list[int] = []
    original = batcher._mark
    batcher._mark = lambda items: (sizes.append(sum(i.samples.size for i in items)), original(items))
    try:
        chunks = [_speechlike(0.2, 40 + i) for i in range(5)] + [_speechlike(1.0, 50)]
        results = await asyncio.gather(*(batcher.apply(c) for c in chunks))
        for x, got in zip(chunks, results):
            assert _snr(got, _alone(watermarker, x)) > 100
        assert sum(sizes) == sum(c.size for c in chunks)
        assert all(size <= 0.5 * SR for size in sizes if size != SR)  # the 1 s chunk: alone, over the bound
        assert SR in sizes
    finally:
        batcher.close()


async def test_a_call_queued_behind_the_close_is_failed_not_left_waiting(watermarker) -> None:
    batcher = WatermarkBatcher(watermarker, SR)
    batcher._closed = True  # as close() has begun: the stop is queued first, then a racing call
    batcher._queue.put(None)
    batcher._closed = False
    racing = asyncio.create_task(batcher.apply(_speechlike(0.2, 60)))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(batcher.close)
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(racing, 5)


def test_the_pass_gets_a_stream_of_its_own_only_when_asked_and_on_a_gpu(watermarker) -> None:
    """``watermark_stream``: by default the pass runs on the current (the vocoder's default)
    stream; ``own`` and ``high`` make one of its own, but only on a GPU: on the CPU there is
    none to make, and the pass runs as before."""
    from gateway.engine.vllm.watermark_batch import work_stream

    assert str(watermarker.perth_net.device) == "cpu"
    assert work_stream(watermarker) is None and work_stream(watermarker, "high") is None
    for kind in ("default", "high"):
        batcher = WatermarkBatcher(watermarker, SR, stream=kind)
        try:
            assert batcher._stream is None
        finally:
            batcher.close()


def test_on_a_gpu_the_stream_is_the_one_asked_for(monkeypatch) -> None:
    """On a GPU: ``default`` none (the current stream), ``own`` a stream at the default
    priority (0), ``high`` one at PyTorch's high priority (-1: its waiting kernels go before
    the vocoder's on the default stream)."""
    import torch

    from gateway.engine.vllm import watermark_batch

    made = []

    class _Stream:
        def __init__(self, device, priority=0):
            made.append((str(device), priority))

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    on_gpu = SimpleNamespace(perth_net=SimpleNamespace(device=torch.device("cuda")))
    assert watermark_batch.work_stream(on_gpu) is None
    assert watermark_batch.work_stream(on_gpu, "default") is None
    watermark_batch.work_stream(on_gpu, "own")
    watermark_batch.work_stream(on_gpu, "high")
    assert made == [("cuda", 0), ("cuda", -1)]


def test_the_inverse_stft_is_torchs_without_its_host_wait() -> None:
    """The pass's inverse STFT (no read-back of the window envelope, so no synchronisation)
    equals ``torch.istft`` (centred, Perth's Hann window of 2048 at a hop of 320) to float
    rounding, for one frame count and another."""
    import torch

    from gateway.engine.vllm.watermark_batch import istft

    torch.manual_seed(0)
    window = torch.hann_window(2048)
    for samples in (32000, 17000):
        x = torch.randn(3, samples)
        spec = torch.stft(x, 2048, 320, window=window, center=True, return_complex=True)
        spec = spec * torch.exp(1j * 0.3 * torch.randn_like(spec.real))  # not a consistent spectrogram
        want = torch.istft(spec, 2048, 320, window=window, center=True)
        got = istft(spec, window, 2048, 320)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-5 * want.abs().max()


def test_the_pass_inverts_without_torch_istft(watermarker, monkeypatch) -> None:
    """The batched pass does not call ``torch.istft`` (whose overlap-add check reads the
    window envelope back to the host: a wait for everything queued on the stream) and still
    gives each chunk upstream's watermark."""
    import torch

    def refuse(*_args, **_kwargs):
        raise AssertionError("torch.istft in the pass")

    chunks = [_speechlike(0.5, 1), _speechlike(0.7, 2), _speechlike(0.5, 3)]
    alone = [_alone(watermarker, x) for x in chunks]  # upstream's call: torch.istft
    monkeypatch.setattr(torch, "istft", refuse)
    marked = mark_batch(watermarker, chunks, SR)
    for want, got in zip(alone, marked):
        assert _snr(got, want) > 100


@pytest.mark.parametrize("kind", ["own", "high"])
def test_a_stream_of_its_own_is_refused_where_it_faulted_on_the_gpu(kind: str) -> None:
    """Served with vLLM's engine core in a process and the vocoder on the default stream, a
    watermark pass on a stream of its own ended in an illegal memory access three times (two
    H200s, an H100); with the thread core and the vocoder on a stream of its own it ran clean
    on every visit. The settings allow only the latter."""
    from gateway.settings import SettingsError, load_settings

    for refused in ({}, {"vllm_engine_core": "thread"},
                    {"vllm_engine_core": "process", "vocoder_sms": 0}):
        with pytest.raises(SettingsError, match="illegal memory access"):
            load_settings(environ={}, overrides={**refused, "watermark_stream": kind})
    for allowed in ({"vllm_engine_core": "thread", "vocoder_stream_priority": "high"},
                    {"vllm_engine_core": "thread", "vocoder_sms": 112}):
        assert load_settings(environ={}, overrides={**allowed, "watermark_stream": kind}).watermark_stream == kind
    assert load_settings(environ={}).watermark_stream == "default"


# --- watermark_resample = "device": the resampling in the pass, on Perth's device ------------


def _voice(seconds: float) -> np.ndarray:
    """A real voice: the built-in ``aria`` at 24 kHz (its FLAC is at that rate or resampled)."""
    import soundfile as sf
    from pathlib import Path

    x, rate = sf.read(Path(__file__).resolve().parents[3] / "voices" / "aria.flac", dtype="float32")
    x = x.mean(axis=1) if x.ndim > 1 else x
    if rate != SR:
        from librosa import resample

        x = resample(x, orig_sr=rate, target_sr=SR)
    return np.ascontiguousarray(x[: int(seconds * SR)], dtype=np.float32)


def test_device_resampling_keeps_the_watermark_and_is_soxrs_audio_but_for_the_filter(watermarker) -> None:
    """The same voice through both passes: the outputs are the same length, 60 dB and more
    apart (the two resamplers' filters differ; the watermark itself lies ~17 dB under the
    speech), and Perth's own detector finds the mark in every frame of both, in none of the
    unmarked voice's majority."""
    x = _voice(3.0)
    other = _speechlike(1.3, 5)
    soxr, _ = mark_batch(watermarker, [x, other], SR)
    device, device_other = mark_batch(watermarker, [x, other], SR, resample="device")
    assert device.dtype == np.float32 and device.shape == soxr.shape and device_other.shape == other.shape
    assert _snr(x, soxr) < 25  # the mark moves the signal: agreement beyond that means the mark agrees
    assert _snr(device, soxr) > 60, _snr(device, soxr)
    unmarked = watermarker.get_watermark(x, SR, round=False)
    assert float(np.mean(unmarked)) < 0.5
    for marked in (soxr, device):
        assert float(np.min(watermarker.get_watermark(marked, SR, round=True))) == 1.0


@pytest.mark.parametrize("samples", [1000, 7777, 24001, 31999])  # Perth pads 1024 a side: no shorter
def test_device_resampling_gives_soxrs_lengths(watermarker, samples: int) -> None:
    x = _speechlike(samples / SR, samples)[:samples]
    assert x.size == samples
    soxr = mark_batch(watermarker, [x, x], SR)
    device = mark_batch(watermarker, [x, x], SR, resample="device")
    assert [d.shape for d in device] == [s.shape for s in soxr]


def test_with_device_resampling_a_chunk_alone_is_the_batched_pass(watermarker, monkeypatch) -> None:
    """No upstream call for a lone chunk: its audio must not depend on whether it had company."""
    x = _speechlike(0.7, 11)
    monkeypatch.setattr(type(watermarker), "apply_watermark", lambda *a, **k: pytest.fail("upstream's call"))
    (alone,) = mark_batch(watermarker, [x], SR, resample="device")
    beside, _ = mark_batch(watermarker, [x, _speechlike(2.0, 12)], SR, resample="device")
    assert _snr(beside, alone) > 100


def test_an_unknown_resampling_is_refused(watermarker) -> None:
    with pytest.raises(ValueError, match="resample"):
        mark_batch(watermarker, [_speechlike(0.2, 1)], SR, resample="fast")
    with pytest.raises(ValueError, match="resample"):
        WatermarkBatcher(watermarker, SR, resample="fast")


async def test_the_batcher_resamples_where_it_is_told(watermarker) -> None:
    batcher = WatermarkBatcher(watermarker, SR, resample="device")
    try:
        chunks = [_voice(1.0), _speechlike(0.6, 13)]
        results = await asyncio.gather(*(batcher.apply(c) for c in chunks))
    finally:
        batcher.close()
    for got, want in zip(results, mark_batch(watermarker, chunks, SR, resample="device")):
        assert _snr(got, want) > 100
    soxr = mark_batch(watermarker, chunks, SR)
    assert all(100 > _snr(got, s) > 40 for got, s in zip(results, soxr))  # not soxr's samples: the device path
