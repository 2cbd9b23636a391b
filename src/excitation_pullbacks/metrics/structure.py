"""Weights-free structure of a map or perturbation: high-frequency energy and total variation."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["high_frequency_energy", "total_variation"]


def high_frequency_energy(maps: Tensor, *, cutoff: float = 0.5) -> Tensor:
    """Fraction of spectral energy above a radial frequency: maps (N, C, H, W) or (N, H, W) -> (N,) in [0, 1].

    Energy: |FFT2|^2 of each channel (DC included), summed over channels. A frequency (fy, fx) in cycles
    per pixel has radius sqrt(fy^2 + fx^2) / 0.5, in units of the Nyquist frequency (1 at Nyquist along an
    axis, up to sqrt(2) in the corners); the result is the energy at radius > ``cutoff`` over the total
    (NaN for an all-zero map). Lower: smoother, more image-like structure.
    """
    if maps.dim() == 3:
        maps = maps[:, None]
    h, w = maps.shape[-2:]
    power = torch.fft.fft2(maps).abs().square().sum(1)  # (N, H, W)
    fy = torch.fft.fftfreq(h, device=maps.device, dtype=power.dtype)
    fx = torch.fft.fftfreq(w, device=maps.device, dtype=power.dtype)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    high = (power * (radius > cutoff)).flatten(1).sum(1)
    return high / power.flatten(1).sum(1)


def total_variation(maps: Tensor, *, normalize: bool = True) -> Tensor:
    """Anisotropic total variation: maps (N, C, H, W) or (N, H, W) -> (N,).

    TV = sum over channels and pixels of |m[h+1, w] - m[h, w]| + |m[h, w+1] - m[h, w]|; with ``normalize``
    divided by the map's L1 norm sum |m| (scale invariant; at most 4; NaN for an all-zero map).
    Lower: smoother.
    """
    if maps.dim() == 3:
        maps = maps[:, None]
    tv = (maps[..., 1:, :] - maps[..., :-1, :]).abs().flatten(1).sum(1) + (
        maps[..., :, 1:] - maps[..., :, :-1]
    ).abs().flatten(1).sum(1)
    if not normalize:
        return tv
    return tv / maps.abs().flatten(1).sum(1)
