"""Gaussian filtering of image batches, shared by the perturbation baseline (blur) and SSIM.

Own implementations rather than torchvision's or scipy's: the blur needs replicate padding at an arbitrary
radius on the inputs' device and dtype (equal to ``scipy.ndimage.gaussian_filter(mode="nearest")``), and
SSIM a "valid" Gaussian window as scikit-image computes it; both are a few lines of torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gaussian_blur", "gaussian_kernel"]


def gaussian_kernel(radius: int, sigma: float, *, dtype: torch.dtype, device=None) -> Tensor:
    """(2 radius + 1,) weights exp(-d^2 / (2 sigma^2)) over d = -radius..radius, normalised to sum 1 (computed
    in float64, returned in ``dtype``)."""
    d = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _blur_matrix(length: int, kernel: Tensor, radius: int) -> Tensor:
    """(length, length) matrix B with (B v)[o] = sum_d kernel[d + radius] v[clamp(o + d, 0, length - 1)]."""
    rows = torch.arange(length, device=kernel.device)[:, None].expand(length, 2 * radius + 1)
    cols = (rows + torch.arange(-radius, radius + 1, device=kernel.device)).clamp(0, length - 1)
    b = torch.zeros(length, length, dtype=kernel.dtype, device=kernel.device)
    return b.index_put_((rows, cols), kernel.expand(length, -1), accumulate=True)


def gaussian_blur(x: Tensor, *, sigma: float = 5.0, radius: int | None = None) -> Tensor:
    """Gaussian blur of x (N, C, H, W), channel by channel, with the same shape and dtype.

    A separable kernel exp(-d^2 / (2 sigma^2)), normalised to sum 1, over d = -radius..radius
    (radius: ceil(3 sigma) by default, i.e. kernel size 2 radius + 1), with replicate padding (the border
    pixel repeated; ``scipy.ndimage.gaussian_filter(mode="nearest", radius=radius)``). sigma in pixels.
    Computed as two banded matrix products (faster than a convolution with a long 1-D kernel).
    """
    if not sigma > 0:
        raise ValueError(f"blur sigma must be positive, got {sigma}")
    r = math.ceil(3 * sigma) if radius is None else int(radius)
    k = gaussian_kernel(r, sigma, dtype=x.dtype, device=x.device)
    h, w = x.shape[-2:]
    return _blur_matrix(h, k, r) @ x @ _blur_matrix(w, k, r).T
