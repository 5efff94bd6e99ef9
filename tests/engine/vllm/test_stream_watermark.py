"""The Perth watermark over streamed chunks agrees with watermarking the whole utterance."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.engine.vllm.watermark import StreamWatermark

SR = 24000


def _speechlike(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    phase = np.cumsum(2 * np.pi * (120 + 40 * np.sin(2 * np.pi * 0.5 * t)) / SR)
    x = sum(np.sin(k * phase) / k for k in range(1, 15))
    env = (0.5 + 0.5 * np.sin(2 * np.pi * 1.7 * t)) ** 2 * (np.sin(2 * np.pi * 0.23 * t) > -0.7)
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * x * env + 0.01 * noise).astype(np.float32)


def _snr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((a - ref) ** 2).sum()))


def _chunks(x: np.ndarray, seconds=(0.8, 1.0, 1.6)) -> list[np.ndarray]:
    out, i = [], 0
    for s in seconds:
        out.append(x[i:i + int(s * SR)])
        i += int(s * SR)
    return out + [x[i:]]


@pytest.fixture(scope="module")
def perth_apply():
    perth = pytest.importorskip("perth")
    wm = perth.PerthImplicitWatermarker(device="cpu")
    return lambda s: np.asarray(wm.apply_watermark(s, sample_rate=SR), dtype=np.float32)


@pytest.mark.slow
def test_streamed_watermark_matches_the_one_shot_watermark(perth_apply) -> None:
    x = _speechlike(4.0)
    one_shot = perth_apply(x)
    assert _snr(x, one_shot) < 30, "the watermark must visibly change the signal for this to test anything"
    naive = np.concatenate([perth_apply(c) for c in _chunks(x)])
    marker = StreamWatermark(perth_apply, SR)
    parts = [marker.push(c) for c in _chunks(x)] + [marker.flush()]
    streamed = np.concatenate(parts)
    assert streamed.shape == one_shot.shape
    assert _snr(naive, one_shot) < 45  # per-chunk watermarking: every seam has its own edges
    assert _snr(streamed, one_shot) > 60
    assert parts[0].size == int(0.7 * SR), "a 0.8 s first chunk emits 0.7 s at once (0.1 s held back)"


def test_held_back_samples_come_out_once_in_order() -> None:
    """With an identity 'watermark' the stream must reproduce its input exactly, whatever the
    chunk sizes (shorter than the holdback included)."""
    x = np.arange(SR * 2, dtype=np.float32)
    marker = StreamWatermark(lambda s: s.copy(), SR)
    sizes = [100, 5000, 1, 3000, 20000, 0, 19899]
    parts, i = [], 0
    for n in sizes:
        parts.append(marker.push(x[i:i + n]))
        i += n
    parts.append(marker.flush())
    assert i == x.size
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert parts[0].size == 0 and parts[1].size == 5100 - int(0.1 * SR)


async def test_the_awaited_form_emits_what_the_plain_one_does() -> None:
    """push_async/flush_async (the engine's, over the batched watermark) and push/flush cut
    the same stream into the same parts."""
    x = np.arange(SR * 2, dtype=np.float32)

    async def mark(s: np.ndarray) -> np.ndarray:
        return s * 2

    plain = StreamWatermark(lambda s: s * 2, SR)
    awaited = StreamWatermark(None, SR, apply_async=mark)
    i = 0
    for n in [100, 5000, 1, 3000, 20000, 0, 19899]:
        np.testing.assert_array_equal(await awaited.push_async(x[i:i + n]), plain.push(x[i:i + n]))
        i += n
    np.testing.assert_array_equal(await awaited.flush_async(), plain.flush())


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_failing_watermark_pass_is_an_engine_error(tmp_path, streaming: bool) -> None:
    """A watermark pass that raises (on the H200 a device fault surfaced there first) ends the
    request with the engine's typed error, which the HTTP layer maps to its envelope, not an
    unhandled exception."""
    from gateway.engine.base import GenerationParams, SynthesisJob
    from gateway.errors import EngineError
    from gateway.models.families import TURBO
    from gateway.tools import bench_engine_host

    settings = bench_engine_host.engine_settings(TURBO, 1, str(tmp_path), watermark=True)
    with bench_engine_host.sampling_without_vllm():
        engine = bench_engine_host.build_engine(TURBO, settings, (0.0, 0.0), (0.0, 0.0), 30, tmp_path)
        calls: list[int] = []

        async def failing(samples, first=False):  # type: ignore[no-untyped-def]
            calls.append(len(samples))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        engine._mark = failing
        await engine.runtimes[TURBO].vocoder.start()
        job = SynthesisJob("w", (bench_engine_host.TEXT,), bench_engine_host.voice_for(TURBO),
                           GenerationParams(max_speech_tokens=30), model=TURBO, streaming=streaming)
        try:
            with pytest.raises(EngineError, match="watermark pass failed: RuntimeError: CUDA error") as caught:
                async for _ in engine.synthesize(job):
                    pass
        finally:
            await engine.close()
    assert calls and isinstance(caught.value.__cause__, RuntimeError)


async def test_the_engine_marks_a_streams_first_window_first_and_no_other(tmp_path) -> None:
    """The watermark call of a stream's first window says so (``first``: with
    ``watermark_first_apart`` the batcher marks it in a pass of first windows); every later
    window's call, the held-back rest's included, does not."""
    from gateway.engine.base import GenerationParams, SynthesisJob
    from gateway.models.families import TURBO
    from gateway.tools import bench_engine_host

    settings = bench_engine_host.engine_settings(TURBO, 1, str(tmp_path), watermark=True)
    with bench_engine_host.sampling_without_vllm():
        engine = bench_engine_host.build_engine(TURBO, settings, (3.0, 0.0), (0.0, 0.0), 120, tmp_path)
        flags: list[bool] = []

        async def mark(samples, first=False):  # type: ignore[no-untyped-def]
            flags.append(first)
            return samples

        engine._mark = mark
        await engine.runtimes[TURBO].vocoder.start()
        job = SynthesisJob("w", (bench_engine_host.TEXT,), bench_engine_host.voice_for(TURBO),
                           GenerationParams(max_speech_tokens=120), model=TURBO, streaming=True)
        try:
            chunks = [c async for c in engine.synthesize(job)]
        finally:
            await engine.close()
    # at least the first window and the held-back rest (more windows where the vocoder plans
    # before T3 ends the utterance; a loaded machine may vocode it as one)
    assert chunks and len(flags) >= 2
    assert flags[0] is True and not any(flags[1:])
