"""HiFT's ``decode`` (mel + NSF source -> 24 kHz waveform) without host synchronisation.

Upstream ``HiFTGenerator.decode`` waits for the GPU three times per call, each a stall of the
vocoder loop (every kernel queued before it must finish before the host can go on):

* ``_stft`` and ``_istft`` copy ``stft_window``, a plain CPU attribute, to the device on every
  call (``.to(x.device)`` from pageable memory is a synchronous copy);
* ``torch.istft`` checks the window's overlap-add envelope for zeros (NOLA) with a host read
  of a device value (``is_scalar_tensor_true``), which also makes it impossible to capture in
  a CUDA graph.

:func:`hift_decode` runs the same layers in the same order through the module's own
submodules, with the window on the device (:func:`window_on_device`, once) and
:func:`istft`, the inverse STFT ``torch.istft`` computes for HiFT's parameters (centred,
one-sided, hann, unnormalised) by inverse real FFT, window and overlap-add (``F.fold``)
divided by the window's squared envelope, without the check: HiFT's hann window at
n_fft = 4 x hop satisfies NOLA everywhere, a property of the constants (asserted once in
:func:`window_on_device`), not of the data.
"""

from __future__ import annotations

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


def istft(spec: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """``torch.istft(spec, n_fft, hop, n_fft, window=window)`` for a (B, n_fft // 2 + 1, T)
    complex one-sided spectrum, centred, unnormalised, no length: (B, hop * (T - 1)) samples.
    No host synchronisation (the overlap-add envelope is not checked: :func:`window_on_device`
    checked the window once)."""
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None]  # (B, n_fft, T)
    t = frames.shape[-1]
    length = n_fft + hop * (t - 1)
    y = F.fold(frames, output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    envelope = F.fold((window ** 2)[None, :, None].expand(1, n_fft, t), output_size=(1, length),
                      kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    half = n_fft // 2
    return y[:, half: length - half] / envelope[:, half: length - half]


def hift_decode(hift: torch.nn.Module, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``hift.decode(x=x, s=s)``: (B, 80, F) mel and (B, 1, S) source -> (B, S) waveform,
    through the module's own layers; its window must be on the device (:func:`window_on_device`)."""
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    window = hift.stft_window
    spec = torch.view_as_real(torch.stft(s.squeeze(1), n_fft, hop, n_fft, window=window, return_complex=True))
    s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
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
    wav = istft(torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase)), n_fft, hop, window)
    return torch.clamp(wav, -hift.audio_limit, hift.audio_limit)
