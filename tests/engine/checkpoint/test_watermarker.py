"""The Perth watermarker as the engines load it (``load_watermarker``): frozen, so that a call
leaves nothing alive behind it. Upstream's ``apply_watermark`` runs its network with autograd
on; with trainable parameters the activations saved for backward outlived every call (the
load test's CUDA memory grew ~1 MiB a request on an H100, the snapshot's sites all in Perth's
encoder). On the CPU with Perth's real weights, on a worker thread as the engines call it."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
perth = pytest.importorskip("perth")

from gateway.engine.checkpoint.components import load_watermarker  # noqa: E402

SR = 24000


def _signal(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(SR // 2) / SR
    return (0.3 * np.sin(2 * np.pi * 140 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _activations_alive_after_calls(watermarker, calls: int) -> tuple[int, int, list[np.ndarray]]:
    """How many of the encoder's activations (each LeakyReLU's output) are still alive after
    ``calls`` ``apply_watermark`` calls on a worker thread, of how many, and the outputs."""
    refs: list[weakref.ref] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))
             for m in watermarker.perth_net.encoder.modules() if isinstance(m, torch.nn.LeakyReLU)]
    outputs: list[np.ndarray] = []
    try:
        worker = threading.Thread(target=lambda: outputs.extend(
            np.asarray(watermarker.apply_watermark(_signal(i), sample_rate=SR), np.float32) for i in range(calls)))
        worker.start()
        worker.join()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(r() is not None for r in refs), len(refs), outputs


def test_a_loaded_watermarker_keeps_no_activation_alive_after_its_calls() -> None:
    watermarker = load_watermarker("cpu")
    assert not any(p.requires_grad for p in watermarker.perth_net.parameters())
    alive, seen, outputs = _activations_alive_after_calls(watermarker, 3)
    assert seen == 3 * 6  # five hidden convolutions and the first, each with its activation
    assert alive == 0
    assert len(outputs) == 3 and all(o.shape == (SR // 2,) and np.isfinite(o).all() for o in outputs)


def test_upstreams_own_loader_keeps_every_calls_activations_which_is_why_the_engines_freeze_it() -> None:
    upstream = perth.PerthImplicitWatermarker(device="cpu")
    alive, seen, upstream_outputs = _activations_alive_after_calls(upstream, 2)
    assert seen == 12 and alive == seen  # what the frozen load fixes (if this fails, upstream changed)
    frozen = load_watermarker("cpu")
    _, _, frozen_outputs = _activations_alive_after_calls(frozen, 2)
    for a, b in zip(upstream_outputs, frozen_outputs, strict=True):  # freezing changes no sample
        np.testing.assert_array_equal(a, b)
