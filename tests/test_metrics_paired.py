"""Paired bootstrap differences: against scipy.stats.bootstrap (paired, percentile) and reproducible by seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from excitation_pullbacks.metrics import paired_difference


def scores():
    rng = np.random.default_rng(0)
    a = rng.normal(0.30, 0.2, 80)
    b = a - rng.normal(0.05, 0.1, 80)  # paired: b tracks a
    return a, b


def test_paired_difference_matches_scipy_bootstrap():
    a, b = scores()
    ours = paired_difference(torch.from_numpy(a), b, resamples=10000, confidence=0.95, seed=1)
    res = scipy.stats.bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=10000,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(1),
    )
    assert ours.mean == pytest.approx(np.mean(a - b), abs=1e-15)
    assert ours.n == 80 and ours.std == pytest.approx(np.std(a - b, ddof=1))
    # scipy draws the resample indices as rng.integers(0, n, (resamples, n)) from the same Generator, so the
    # bootstrap means and their percentiles agree to rounding
    assert ours.low == pytest.approx(res.confidence_interval.low, abs=1e-12)
    assert ours.high == pytest.approx(res.confidence_interval.high, abs=1e-12)
    assert ours.low < ours.mean < ours.high


def test_paired_difference_is_reproducible_and_drops_non_finite_pairs():
    a, b = scores()
    first = paired_difference(a, b, seed=7)
    assert paired_difference(a, b, seed=7) == first
    assert paired_difference(a, b, seed=8) != first
    a2, b2 = np.append(a, np.nan), np.append(b, 1.0)
    assert paired_difference(a2, b2, seed=7) == first
    empty = paired_difference([np.nan], [1.0])
    assert empty.n == 0 and math.isnan(empty.mean)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(a, b, confidence=1.0)
