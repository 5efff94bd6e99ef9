"""HiFT with its elementwise work fused (``vocoder_hift_kernels = "fused"``; issues 17 and 18,
the vocoder's largest stage for Turbo).

One HiFT decode is ~960 PyTorch operations (counted on the CPU model, 2026-12-07), and most of
them are not its 77 convolutions:

* **weight norm**: every convolution is ``parametrizations.weight_norm``'d, so every call
  recomputes each weight from its direction and gain (77 ``_weight_norm`` launches, ~170 MB
  of weights read and written a call). Inference never changes them: :func:`fold_weight_norm`
  computes each weight once, by the parametrization's own call, so the values are the same;
* **Snake**: 72 activations ``x + 1/(a + 1e-9) * sin(a x)^2`` over a (B, C, T) tensor, each
  five full-tensor kernels (a product, the sine, the square, a product, a sum), every one
  reading and writing the whole activation in fp32. At the last upsampling stage (64 channels,
  120 samples a mel frame) one of them moves ~4 GB for a batch of 64 windows of 200 frames.
  :class:`FusedSnake` is one Triton launch that reads ``x`` once and writes the result once,
  the same float32 operations in the same order (``1/(a + 1e-9)`` taken by PyTorch once at
  load; the sine libdevice's ``__nv_sinf``, as PyTorch's CUDA ``sin``, checked in the PTX), so
  a result can differ from upstream's only where the compiler contracts the last product and
  sum into one rounding.

:func:`fused_hift` builds a copy of HiFT with both (the upstream module stays as it was: the
reference path and parity checks use it). On a CPU :class:`FusedSnake` computes upstream's
formula with PyTorch (the kernel is for CUDA tensors; tests run it through Triton's
interpreter). Triton is imported with this module: ``S3GenBatch`` imports it only for a fused
HiFT.
"""

from __future__ import annotations

import copy

import torch
import triton
import triton.language as tl
from torch import nn

SNAKE_BLOCK = 1024
"""Samples of one channel row one program handles."""


def _snake(x_ptr, out_ptr, alpha_ptr, inv_ptr, channels, length, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one (batch row, channel) pair
    start = tl.program_id(1) * BLOCK
    a = tl.load(alpha_ptr + row % channels)
    inv = tl.load(inv_ptr + row % channels)
    cols = start + tl.arange(0, BLOCK)
    inside = cols < length
    x = tl.load(x_ptr + row * length + cols, mask=inside, other=0.0)
    s = tl.sin(x * a)  # libdevice's __nv_sinf on the GPU, as PyTorch's CUDA sin (not sin.approx)
    tl.store(out_ptr + row * length + cols, x + inv * (s * s), mask=inside)


_compiled = triton.jit(_snake, do_not_specialize=["channels", "length"])
"""One build: the channel count and length change with the layer and the batch; the pointers'
alignment (PyTorch's allocations) does not."""


def snake(x: torch.Tensor, alpha: torch.Tensor, inv: torch.Tensor, *, kernel=None) -> torch.Tensor:
    """``x + inv * sin(alpha * x)^2`` per channel of a (B, C, T) float32 tensor, in one launch
    (``kernel``: another build of :func:`_snake`, Triton's interpreter in tests)."""
    if x.dim() != 3 or x.dtype != torch.float32 or alpha.shape != (x.shape[1],) or inv.shape != alpha.shape:
        raise ValueError(f"snake wants (B, C, T) float32 with C alphas, got {tuple(x.shape)} {x.dtype}, "
                         f"{tuple(alpha.shape)} alphas")
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, length = x.shape[0] * x.shape[1], x.shape[2]
    if rows and length:
        grid = (rows, (length + SNAKE_BLOCK - 1) // SNAKE_BLOCK)
        (kernel or _compiled)[grid](x, out, alpha, inv, x.shape[1], length, BLOCK=SNAKE_BLOCK, num_warps=4)
    return out


class FusedSnake(nn.Module):
    """Upstream ``hifigan.Snake`` (linear-scale alpha) as one kernel on CUDA tensors; its alpha
    and ``1/(alpha + 1e-9)`` kept as float32 buffers, taken once from the module it replaces."""

    def __init__(self, upstream: nn.Module) -> None:
        super().__init__()
        if getattr(upstream, "alpha_logscale", False):
            raise ValueError("only linear-scale Snake alphas are fused (upstream HiFT's)")
        with torch.no_grad():
            alpha = upstream.alpha.detach().float().contiguous()
            self.register_buffer("alpha", alpha)
            self.register_buffer("inv", 1.0 / (alpha + upstream.no_div_by_zero))  # as upstream's forward
        self.kernel = None
        """Another build of the kernel (tests); None: the JIT one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or self.kernel is not None:
            return snake(x, self.alpha, self.inv, kernel=self.kernel)
        return x + self.inv[None, :, None] * torch.sin(x * self.alpha[None, :, None]) ** 2


def fold_weight_norm(module: nn.Module) -> int:
    """Every weight-norm parametrization under ``module`` replaced by the weight it gives now
    (computed once by the parametrization itself: the same values); how many.

    Not ``parametrize.remove_parametrizations``: it deletes the ``weight`` property from the
    module's parametrized class, which a ``deepcopy`` shares with the module it copied, so
    folding a copy that way would break upstream's own HiFT (tested)."""
    from torch.nn.utils import parametrize

    folded = 0
    for sub in list(module.modules()):
        if not parametrize.is_parametrized(sub):
            continue
        if set(sub.parametrizations.keys()) != {"weight"}:
            raise ValueError(f"{type(sub).__name__} has parametrizations other than its weight's")
        with torch.no_grad():
            weight = sub.weight.detach().clone()
        plain = type(sub).__bases__[0]  # parametrize puts a class of its own over the module's
        del sub._modules["parametrizations"]
        sub.__class__ = plain
        sub.weight = nn.Parameter(weight, requires_grad=False)
        folded += 1
    return folded


def fuse_snakes(module: nn.Module, *, kernel=None) -> int:
    """Every upstream Snake under ``module`` replaced by a :class:`FusedSnake`; how many."""
    fused = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Snake" and hasattr(child, "no_div_by_zero"):
                replacement = FusedSnake(child)  # its buffers on the alpha's device
                replacement.kernel = kernel
                setattr(parent, name, replacement)
                fused += 1
    return fused


def fused_hift(hift: nn.Module, *, kernel=None) -> nn.Module:
    """A copy of ``hift`` (float32, on its device) with its weight norms folded and its Snakes
    fused; ``hift`` itself is left as it was."""
    copied = copy.deepcopy(hift)
    if fold_weight_norm(copied) == 0 or fuse_snakes(copied, kernel=kernel) == 0:
        raise ValueError("this HiFT has no weight-normed convolutions or no Snake activations to fuse")
    return copied.eval()


def warm_up(device: torch.device | str) -> None:
    """Build the kernel now (a vocoder's start), not in the first batch or a graph capture: both
    of its builds, for an input whose address is a multiple of 16 bytes (Triton's vector loads;
    every fresh PyTorch tensor) and for one that is not (a row slice of a batch)."""
    if torch.device(device).type == "cuda":
        ones = torch.ones(2, device=device)
        flat = torch.zeros(7, device=device)
        snake(flat[:6].view(1, 2, 3), ones, ones)  # at the allocation's start: aligned
        snake(flat[1:].view(1, 2, 3), ones, ones)  # 4 bytes in: not
        torch.cuda.synchronize(device)
