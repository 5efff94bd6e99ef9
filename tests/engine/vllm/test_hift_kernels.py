"""HiFT with its elementwise work fused (``vocoder_hift_kernels = "fused"``): the Snake kernel
(through Triton's interpreter, and built for an H100 here to check what its sine lowers to)
against upstream's activation, the folded weight norms against the parametrized ones, and the
fused copy of HiFT against upstream's decode; upstream's module is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import triton.experimental.gluon  # noqa: F401  (the interpreter imports it; as tests/engine/vllm/test_fused_kernel.py)
from triton.runtime.interpreter import InterpretedFunction
from triton_support import build_for_h100

from gateway.engine.vllm.hift_decode import hift_decode, spectra_on_device
from gateway.engine.vllm.hift_kernels import (
    SNAKE_BLOCK,
    FusedSnake,
    _snake,
    fold_weight_norm,
    fused_hift,
    fuse_snakes,
    snake,
)
from gateway.engine.vllm.s3gen_batch import HiftRow, NoiseTapes, S3GenBatch

INTERPRETED = InterpretedFunction(_snake)


def upstream_snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``hifigan.Snake.forward``, written out."""
    a = alpha[None, :, None]
    return x + (1.0 / (a + 0.000000001)) * pow(torch.sin(x * a), 2)


@pytest.fixture
def hift(s3gen):
    return s3gen.mel2wav.float().eval()


def _mel_and_source(frames: int, rows: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 80, frames, generator=g), 0.1 * torch.randn(rows, 1, frames * 480, generator=g)


@pytest.mark.parametrize("shape", [(2, 3, SNAKE_BLOCK * 2 + 37), (1, 5, 7), (3, 2, SNAKE_BLOCK)])
def test_the_kernel_is_upstreams_snake(shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = 6 * torch.randn(*shape, generator=g)
    alpha = 0.1 + 3 * torch.rand(shape[1], generator=g)
    inv = 1.0 / (alpha + 0.000000001)
    got = snake(x, alpha, inv, kernel=INTERPRETED)
    torch.testing.assert_close(got, upstream_snake(x, alpha), rtol=2e-6, atol=2e-6)


def test_the_kernel_takes_a_strided_input_as_its_values() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 3, generator=g).transpose(1, 2)  # (2, 3, 40), not contiguous
    alpha = 0.5 + torch.rand(3, generator=g)
    got = snake(x, alpha, 1.0 / (alpha + 0.000000001), kernel=INTERPRETED)
    torch.testing.assert_close(got, upstream_snake(x, alpha), rtol=2e-6, atol=2e-6)


def test_the_kernel_refuses_what_it_was_not_built_for() -> None:
    alpha = torch.ones(3)
    with pytest.raises(ValueError, match="float32"):
        snake(torch.zeros(2, 3, 4, dtype=torch.bfloat16), alpha, alpha, kernel=INTERPRETED)
    with pytest.raises(ValueError, match="alphas"):
        snake(torch.zeros(2, 4, 4), alpha, alpha, kernel=INTERPRETED)


def test_the_kernel_builds_for_an_h100_with_libdevices_sine() -> None:
    """What the GPU runs: the kernel compiles for sm_90 (Triton's own ptxas, no GPU needed),
    and its sine is libdevice's accurate ``__nv_sinf``, as PyTorch's CUDA ``sin``, not the
    approximate ``sin.approx`` whose error grows with the argument."""
    signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "alpha_ptr": "*fp32", "inv_ptr": "*fp32",
                 "channels": "i32", "length": "i32", "BLOCK": "constexpr"}
    (built,) = build_for_h100("gateway.engine.vllm.hift_kernels:_compiled", signature, [{"BLOCK": SNAKE_BLOCK}])
    assert built == {"cubin": True, "nv_sinf": True, "sin_approx": False}


def test_folded_weight_norms_give_the_same_weights(hift) -> None:
    mel, source = _mel_and_source(6)
    spectra = spectra_on_device(hift, "cpu")
    with torch.inference_mode():
        expected = hift_decode(hift, mel, source, spectra)
    folded = copy.deepcopy(hift)
    assert fold_weight_norm(folded) == 82  # 77 in the decode, 5 in the f0 predictor
    assert fold_weight_norm(folded) == 0  # none left
    with torch.inference_mode():
        got = hift_decode(folded, mel, source, spectra)
    assert torch.equal(got, expected)


def test_the_fused_copy_decodes_as_upstream_and_leaves_upstream_alone(hift) -> None:
    from torch.nn.utils import parametrize

    mel, source = _mel_and_source(5)
    spectra = spectra_on_device(hift, "cpu")
    fused = fused_hift(hift)
    snakes = [m for m in fused.modules() if isinstance(m, FusedSnake)]
    assert len(snakes) == 72 and not any(type(m).__name__ == "Snake" for m in fused.modules())
    assert not any(parametrize.is_parametrized(m) for m in fused.modules())
    # upstream's module is as it was: parametrized, its own Snakes
    assert sum(type(m).__name__ == "Snake" for m in hift.modules()) == 72
    assert parametrize.is_parametrized(hift.conv_pre, "weight")
    with torch.inference_mode():
        expected = hift.decode(x=mel, s=source)
        fused_hift(hift)  # a second copy from the same module: upstream's weights are still there
        on_cpu = hift_decode(fused, mel, source, spectra)  # FusedSnake's PyTorch formula
        for m in snakes:
            m.kernel = INTERPRETED
        kernel = hift_decode(fused, mel, source, spectra)  # the Triton kernel, interpreted
    torch.testing.assert_close(on_cpu, expected, rtol=1e-4, atol=1e-5)  # as hift_decode vs decode
    torch.testing.assert_close(kernel, on_cpu, rtol=1e-4, atol=1e-5)


def test_a_logscale_snake_is_not_fused() -> None:
    from chatterbox.models.s3gen.hifigan import Snake

    module = torch.nn.Sequential(Snake(4, alpha_logscale=True))
    with pytest.raises(ValueError, match="linear-scale"):
        fuse_snakes(module)


def test_the_batch_runs_the_fused_copy_with_the_same_audio(s3gen) -> None:
    s3gen.float()
    tapes = NoiseTapes.generate(0, flow_frames=100, hift_samples=40 * 480, harmonics=9, device="cpu")
    plain = S3GenBatch(s3gen, device="cpu", flow_dtype=torch.float32, flow_steps=2, tapes=tapes)
    fused = S3GenBatch(s3gen, device="cpu", flow_dtype=torch.float32, flow_steps=2, tapes=tapes,
                       hift_kernels="fused")
    assert fused.hift is not s3gen.mel2wav and plain.hift is s3gen.mel2wav
    mel, _ = _mel_and_source(9, rows=3, seed=4)
    rows = [HiftRow(mel[i], 9 * i, None, 2) for i in range(3)]
    for (a, pa), (b, pb) in zip(plain.run_hift(rows), fused.run_hift(rows)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pb, pa)
    with pytest.raises(ValueError, match="upstream or fused"):
        S3GenBatch(s3gen, device="cpu", flow_dtype=torch.float32, flow_steps=2, tapes=tapes, hift_kernels="bf16")
