"""HiFT's ``decode`` (mel + NSF source -> 24 kHz waveform) without host synchronisation and
without cuFFT, so that it can be captured in a CUDA graph that stays valid.

Upstream ``HiFTGenerator.decode`` waits for the GPU three times per call, each a stall of the
vocoder loop (every kernel queued before it must finish before the host can go on):

* ``_stft`` and ``_istft`` copy ``stft_window``, a plain CPU attribute, to the device on every
  call (``.to(x.device)`` from pageable memory is a synchronous copy);
* ``torch.istft`` checks the window's overlap-add envelope for zeros (NOLA) with a host read
  of a device value (``is_scalar_tensor_true``), which also makes it impossible to capture in
  a CUDA graph.

And its transforms run on cuFFT plans, which PyTorch owns and manages behind a graph's back:
a plan lives in a least-recently-used cache (4096 per device) and is destroyed when pushed
out, and every eager call that shares a plan re-targets its stream and work area. A CUDA graph
that captured an FFT keeps that plan's kernels but not the plan. On the H200 (2026-12-04) the
original's 128-stream HTTP row ended at its first batches in ``CUDA error: an illegal memory
access`` and a segfault in ``cuGraphLaunch``. New there were batches of more than 32 rows
(the 32-stream row before it had none), so graphs of 64 rows replayed for the first time, and
of those only HiFT's held library-managed state (its FFT plans).
Not confirmed as the cause on a GPU yet (docs/benchmarks.md); a graph without cuFFT has no
such state to lose either way.

:func:`hift_decode` runs the same layers in the same order through the module's own
submodules, with HiFT's two transforms as products with fixed matrices (:class:`Spectra`,
built once on the device): at n_fft = 16 a DFT is a (16 x 18) matrix, and a matrix product
keeps no state a graph could outlive. :func:`stft` is ``torch.stft`` for HiFT's parameters
(centred with reflection, one-sided, hann, unnormalised), its real and imaginary parts stacked
as upstream stacks them; :func:`istft` the inverse ``torch.istft`` computes: inverse real DFT,
window and overlap-add (``F.fold``) divided by the window's squared envelope, without the
check: HiFT's hann window at n_fft = 4 x hop satisfies NOLA everywhere, a property of the
constants (asserted once in :func:`window_on_device`), not of the data. The products run in
fp32 as PyTorch's matmul does by default (TF32 off: ``torch.backends.cuda.matmul.allow_tf32``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_on_device(hift: torch.nn.Module, device: torch.device | str) -> torch.Tensor:
    """Move ``hift.stft_window`` to ``device`` in place (upstream's ``.to(device)`` calls then
    copy nothing) and check the overlap-add condition ``torch.istft`` would check per call."""
    window = hift.stft_window.to(device=device, dtype=torch.float32)
    hift.stft_window = window
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    if window.numel() != n_fft or n_fft % hop:
        raise ValueError("HiFT's STFT window must be n_fft long with n_fft a multiple of hop")
    squared = (window.detach().cpu() ** 2).reshape(n_fft // hop, hop).sum(dim=0)
    if float(squared.min()) <= 1e-11:
        raise ValueError("HiFT's STFT window violates the overlap-add condition")
    return window


@dataclass(frozen=True)
class Spectra:
    """HiFT's STFT and inverse STFT as matrix products, on one device (:func:`spectra_on_device`)."""

    n_fft: int
    hop: int
    window: torch.Tensor
    """(n_fft,) the analysis and synthesis window."""
    analysis: torch.Tensor
    """(n_fft, 2 * bins): a windowed frame times this is its one-sided DFT, real parts then
    imaginary parts (bins = n_fft // 2 + 1)."""
    synthesis: torch.Tensor
    """(2 * bins, n_fft): real parts then imaginary parts of a one-sided spectrum times this is
    its inverse real DFT (as ``irfft``: the imaginary parts of DC and Nyquist count for nothing),
    windowed."""


def spectra_on_device(hift: torch.nn.Module, device: torch.device | str) -> Spectra:
    """:class:`Spectra` for ``hift``'s STFT parameters on ``device``; moves its window there
    too (:func:`window_on_device`, which checks the overlap-add condition)."""
    window = window_on_device(hift, device)
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    bins = n_fft // 2 + 1
    w = window.detach().cpu().double()
    angle = 2 * math.pi * torch.outer(torch.arange(n_fft, dtype=torch.float64),
                                      torch.arange(bins, dtype=torch.float64)) / n_fft  # (n, k)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sin[:, 0] = 0.0  # exactly: DC and Nyquist have no imaginary part
    if n_fft % 2 == 0:
        sin[:, -1] = 0.0
    analysis = torch.cat([w[:, None] * cos, -w[:, None] * sin], dim=1)  # (n, 2k)
    weight = torch.full((bins,), 2.0, dtype=torch.float64)  # one-sided: the other half's twins
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0
    synthesis = torch.cat([(weight[:, None] * cos.T), -(weight[:, None] * sin.T)], dim=0) / n_fft * w[None, :]
    return Spectra(n_fft, hop, window, analysis.float().to(window.device), synthesis.float().to(window.device))


def stft(signal: torch.Tensor, spectra: Spectra) -> torch.Tensor:
    """``torch.stft(signal, n_fft, hop, n_fft, window, return_complex=True)`` for (B, S)
    samples (centred, reflection padding) as (B, 2 * bins, 1 + S // hop): real parts, then
    imaginary parts."""
    half = spectra.n_fft // 2
    padded = F.pad(signal[:, None], (half, half), mode="reflect")[:, 0]
    frames = padded.unfold(-1, spectra.n_fft, spectra.hop)  # (B, T, n_fft)
    return torch.matmul(frames, spectra.analysis).transpose(1, 2)


def istft(real: torch.Tensor, imag: torch.Tensor, spectra: Spectra) -> torch.Tensor:
    """``torch.istft(torch.complex(real, imag), n_fft, hop, n_fft, window=window)`` for
    (B, bins, T) one-sided spectra, centred, unnormalised, no length: (B, hop * (T - 1))
    samples. No host synchronisation (the overlap-add envelope is not checked:
    :func:`window_on_device` checked the window once)."""
    n_fft, hop = spectra.n_fft, spectra.hop
    spec = torch.cat([real, imag], dim=1).transpose(1, 2)  # (B, T, 2 * bins)
    frames = torch.matmul(spec, spectra.synthesis).transpose(1, 2)  # (B, n_fft, T), windowed
    t = frames.shape[-1]
    length = n_fft + hop * (t - 1)
    y = F.fold(frames, output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    window = spectra.window
    envelope = F.fold((window ** 2)[None, :, None].expand(1, n_fft, t), output_size=(1, length),
                      kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    half = n_fft // 2
    return y[:, half: length - half] / envelope[:, half: length - half]


def hift_decode(hift: torch.nn.Module, x: torch.Tensor, s: torch.Tensor, spectra: Spectra) -> torch.Tensor:
    """``hift.decode(x=x, s=s)``: (B, 80, F) mel and (B, 1, S) source -> (B, S) waveform,
    through the module's own layers, its transforms those of ``spectra``
    (:func:`spectra_on_device`)."""
    n_fft = spectra.n_fft
    s_stft = stft(s.squeeze(1), spectra)
    x = hift.conv_pre(x)
    for i in range(hift.num_upsamples):
        x = F.leaky_relu(x, hift.lrelu_slope)
        x = hift.ups[i](x)
        if i == hift.num_upsamples - 1:
            x = hift.reflection_pad(x)
        si = hift.source_resblocks[i](hift.source_downs[i](s_stft))
        x = x + si
        xs = None
        for j in range(hift.num_kernels):
            out = hift.resblocks[i * hift.num_kernels + j](x)
            xs = out if xs is None else xs + out
        x = xs / hift.num_kernels
    x = hift.conv_post(F.leaky_relu(x))
    magnitude = torch.clip(torch.exp(x[:, : n_fft // 2 + 1, :]), max=1e2)
    phase = torch.sin(x[:, n_fft // 2 + 1:, :])  # upstream's: the sine is redundant, kept for parity
    wav = istft(magnitude * torch.cos(phase), magnitude * torch.sin(phase), spectra)
    return torch.clamp(wav, -hift.audio_limit, hift.audio_limit)
