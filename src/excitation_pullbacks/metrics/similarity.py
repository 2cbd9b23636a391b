"""Similarity of two attribution maps per sample: Pearson and Spearman correlation, SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .filters import gaussian_kernel

__all__ = ["pearson", "spearman", "ssim"]


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks (0-based) along dim 1 with ties given their mean rank, as scipy.stats.rankdata."""
    s = v.sort(dim=1).values.contiguous()
    less = torch.searchsorted(s, v.contiguous(), side="left")
    leq = torch.searchsorted(s, v.contiguous(), side="right")
    return (less + leq - 1).to(torch.float64 if v.dtype == torch.float64 else torch.float32) / 2


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per sample of a and b (N, ...) (flattened): (N,), in [-1, 1].

    As ``scipy.stats.pearsonr(a, b, axis=1)``: NaN for a constant sample. Higher: more linearly related.
    """
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    # scale first (as scipy does) so that tiny or huge values neither underflow nor overflow when squared
    a = a / a.abs().amax(1, keepdim=True)
    b = b / b.abs().amax(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return r.clamp(-1.0, 1.0)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per sample of a and b (N, ...) (flattened): (N,), in [-1, 1].

    Pearson correlation of average ranks (ties share their mean rank, as ``scipy.stats.spearmanr``); NaN
    for a constant sample. Higher: more similar orderings.
    """
    ra, rb = _average_ranks(a.flatten(1)), _average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def ssim(
    a: Tensor,
    b: Tensor,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) per sample: a, b (N, H, W) or (N, C, H, W) -> (N,).

    Local means, variances and covariance under a Gaussian window of std ``sigma`` and radius
    int(truncate * sigma + 0.5) (11 x 11 by default), population (not sample) covariance,
    C1 = (k1 L)^2, C2 = (k2 L)^2 with L = data_range; the SSIM map is averaged over the positions where the
    window lies inside the image (and over channels); images smaller than the window get the largest window
    radius that fits (the same Gaussian weights, truncated). For images at least as large as the window it
    equals ``skimage.metrics.structural_similarity(a, b,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False, data_range=data_range)``.
    Higher: more similar (1 for identical inputs).
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[:, None], b[:, None]
    n, c, h, w = a.shape
    r = min(int(truncate * sigma + 0.5), (min(h, w) - 1) // 2)  # window clipped to fit small images
    k = gaussian_kernel(r, sigma, dtype=a.dtype, device=a.device)

    def filt(z: Tensor) -> Tensor:  # "valid" separable Gaussian filter
        z = F.conv2d(z.reshape(n * c, 1, h, w), k.view(1, 1, -1, 1))
        return F.conv2d(z, k.view(1, 1, 1, -1))

    ux, uy = filt(a), filt(b)
    vx, vy, vxy = filt(a * a) - ux * ux, filt(b * b) - uy * uy, filt(a * b) - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)
