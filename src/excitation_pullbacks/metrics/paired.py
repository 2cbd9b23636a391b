"""Paired comparison of two methods scored on the same images: the mean difference and a bootstrap interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PairedDifference", "paired_difference"]


@dataclass(frozen=True)
class PairedDifference:
    """mean: mean of a - b over the n images where both are finite; low, high: the percentile bootstrap
    interval of that mean at ``confidence``; std: sample std (ddof 1) of the differences (NaN for n < 2)."""

    mean: float
    low: float
    high: float
    std: float
    n: int
    confidence: float
    resamples: int


def paired_difference(
    a, b, *, resamples: int = 10000, confidence: float = 0.95, seed: int = 0, chunk: int = 1000
) -> PairedDifference:
    """Mean of the per-image differences a - b and its percentile bootstrap confidence interval.

    a, b: (N,) scores of two methods on the same N images (tensors, arrays or lists); pairs where either is
    NaN or infinite are dropped. ``resamples`` bootstrap means of N differences drawn with replacement by
    ``numpy.random.default_rng(seed).integers`` (``chunk`` resamples at a time); the interval is the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles (linear interpolation) of those means, as
    ``scipy.stats.bootstrap(method="percentile")`` and the published paired comparisons compute it.
    Returns a :class:`PairedDifference` (NaNs when no pair is finite).
    """
    if resamples < 1 or chunk < 1:
        raise ValueError(f"resamples and chunk must be >= 1, got {resamples}, {chunk}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    def array(v) -> np.ndarray:
        if isinstance(v, Tensor):
            v = v.detach().cpu().to(torch.float64).numpy()
        return np.asarray(v, dtype=np.float64).reshape(-1)

    x, y = array(a), array(b)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need equal lengths, got {x.size} and {y.size}")
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    n = d.size
    if n == 0:
        return PairedDifference(np.nan, np.nan, np.nan, np.nan, 0, confidence, resamples)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    std = float(d.std(ddof=1)) if n > 1 else float("nan")
    return PairedDifference(float(d.mean()), float(low), float(high), std, n, confidence, resamples)
