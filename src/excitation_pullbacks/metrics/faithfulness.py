"""Faithfulness: do the maps predict how the model's target logit changes when the input is perturbed?

Four metrics as Quantus 0.6 defines them (Infidelity, FaithfulnessCorrelation, FaithfulnessEstimate,
MonotonicityCorrelation), batched in torch: the perturbed images are built on the fly and scored a chunk at
a time; scores are per image. Defaults are Quantus's; :data:`~excitation_pullbacks.metrics.protocol.PUBLISHED`
holds the settings of the published comparison, including the two variants it uses (infidelity with optimal
scaling, faithfulness correlation over every patch).

Quantus's ``normalise`` (division of all maps of a call by their largest |value|) does not change the
correlation metrics here, so it has no parameter. Random draws: ``draws`` takes the replacement values in
the order Quantus draws them (see :func:`~excitation_pullbacks.metrics.scoring.replacement_values`), else
they come from ``generator`` (None: torch's global RNG).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import class_targets, warn_if_training
from ..state import keeps_model
from ..stopping import ShouldStop
from .scoring import Baseline, expand_maps, perturbed_scores, replacement_values, target_scores
from .similarity import pearson, spearman

__all__ = ["faithfulness_correlation", "faithfulness_estimate", "infidelity", "monotonicity_correlation"]


def _block_map(h: int, w: int, patch: int, device) -> Tensor:
    """(H, W) index of the patch x patch block each pixel lies in, blocks in row-major order."""
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch size {patch} must divide the image height {h} and width {w}")
    rows = torch.arange(h, device=device) // patch
    cols = torch.arange(w, device=device) // patch
    return rows[:, None] * (w // patch) + cols[None, :]


def _block_sums(v: Tensor, blocks: Tensor, count: int) -> Tensor:
    """v (N, C, H, W) summed over channels and over each block of ``blocks`` (H, W): (N, count)."""
    per_pixel = v.sum(1).flatten(1)
    out = torch.zeros(v.shape[0], count, dtype=v.dtype, device=v.device)
    return out.scatter_add_(1, blocks.flatten()[None].expand_as(per_pixel), per_pixel)


def _prepare(model: nn.Module, x: Tensor, target, maps: Tensor, absolute: bool) -> tuple[Tensor, Tensor, Tensor]:
    warn_if_training(model, stacklevel=4)
    x = x.detach()
    t = class_targets(target, x.shape[0], x.device, grid=False)
    return x, t, expand_maps(maps, x, absolute=absolute)


@keeps_model
def infidelity(
    model: nn.Module,
    x: Tensor,
    target,
    maps: Tensor,
    *,
    patch_sizes: tuple[int, ...] = (4,),
    samples: int = 10,
    baseline: Baseline = "black",
    uniform_low: float = 0.0,
    uniform_high: float = 1.0,
    scaling: str = "none",
    absolute: bool = False,
    draws: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    should_stop: ShouldStop = None,
) -> Tensor:
    """Infidelity (Yeh et al. 2019) with square patches, as Quantus ``Infidelity``. **Lower is better.**

    x: (N, C, H, W); target: (N,) classes; maps: (N, C or 1, H, W). For each of ``samples`` repetitions and
    each patch size p (which must divide H and W), the p x p blocks (all channels) are replaced one after the
    other in row-major order, cumulatively: perturbation k has blocks 1..k replaced by ``baseline`` (with
    ``uniform``, one value per image and block). With I = x - x_k: a_k = <maps, I> and
    b_k = f(x) - f(x_k), f the target logit.
    scaling: ``none`` (Quantus): mean over k of (b_k - a_k)^2, averaged over patch sizes, then samples.
    ``optimal`` (the published variant, Captum's ``normalize=True``): the maps scaled by the best
    beta = sum a b / sum a^2 over all perturbations (1 where sum a^2 = 0): mean of (beta a_k - b_k)^2.
    absolute: |maps| first (Quantus ``abs``). draws: (samples, blocks, N) replacement values, blocks the
    number of blocks over all patch sizes in order.
    Returns (N,).
    """
    if scaling not in ("none", "optimal"):
        raise ValueError(f"scaling must be none or optimal, got {scaling!r}")
    if baseline == "mean":
        raise ValueError("infidelity replaces blocks cumulatively; choose uniform, black, white or a number")
    if samples < 1 or not patch_sizes:
        raise ValueError(f"infidelity needs samples >= 1 and patch sizes, got {samples}, {patch_sizes}")
    x, t, a = _prepare(model, x, target, maps, absolute)
    n, _, h, w = x.shape
    layouts = [(_block_map(h, w, int(p), x.device), (h // int(p)) * (w // int(p))) for p in patch_sizes]
    total = sum(k for _, k in layouts)
    values = replacement_values(
        x,
        baseline,
        (samples, total, n),
        uniform_low=uniform_low,
        uniform_high=uniform_high,
        draws=draws,
        generator=generator,
    )
    y0 = target_scores(model, x, t, batch_size=batch_size)
    losses = torch.zeros(samples, len(layouts), n, dtype=x.dtype, device=x.device)
    a2, ab, b2 = (torch.zeros(n, dtype=x.dtype, device=x.device) for _ in range(3))
    for s in range(samples):
        offset = 0
        for i, (blocks, count) in enumerate(layouts):
            v = values[s, offset : offset + count].T  # (N, count)
            offset += count
            fill = v[:, blocks][:, None]  # (N, 1, H, W)
            a_k = _block_sums((x - fill) * a, blocks, count).cumsum(1)

            def build(k0: int, k1: int, blocks=blocks, fill=fill) -> Tensor:
                kk = torch.arange(k0 + 1, k1 + 1, device=x.device)
                replaced = blocks[None] < kk[:, None, None]  # (L, H, W)
                return torch.where(replaced[:, None, None], fill[None], x[None])

            y = perturbed_scores(model, t, count, build, batch_size=batch_size, should_stop=should_stop)
            b_k = y0[:, None] - y
            losses[s, i] = ((b_k - a_k) ** 2).mean(1)
            a2 += (a_k**2).sum(1)
            ab += (a_k * b_k).sum(1)
            b2 += (b_k**2).sum(1)
    if scaling == "none":
        return losses.mean(1).mean(0)
    beta = ab / torch.where(a2 != 0, a2, torch.ones_like(a2))
    return (beta**2 * a2 - 2 * beta * ab + b2) / (samples * total)


@keeps_model
def faithfulness_correlation(
    model: nn.Module,
    x: Tensor,
    target,
    maps: Tensor,
    *,
    patch_size: int | None = None,
    runs: int = 100,
    subset_size: int = 224,
    baseline: Baseline = "black",
    uniform_low: float = 0.0,
    uniform_high: float = 1.0,
    absolute: bool = False,
    subsets: Tensor | None = None,
    draws: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    should_stop: ShouldStop = None,
) -> Tensor:
    """Faithfulness correlation (Bhatt et al. 2020), as Quantus ``FaithfulnessCorrelation``. **Higher is better.**

    Pearson correlation, per image, between the attribution summed over a perturbed set of features and the
    drop f(x) - f(x') of the target logit when that set alone is replaced by ``baseline``.
    patch_size None (Quantus): ``runs`` random sets of ``subset_size`` features (channel x pixel entries of
    the flattened image), drawn from ``generator`` or given as ``subsets`` (runs, N, subset_size) indices (the
    order Quantus draws them: ``np.random.choice(C*H*W, subset_size, replace=False)`` per run and image).
    patch_size p (the published variant): every p x p patch (all channels, p dividing H and W) in turn.
    absolute: |maps| first. draws: (runs or patches, N) replacement values for ``uniform``.
    Returns (N,) in [-1, 1] (NaN where either side is constant).
    """
    x, t, a = _prepare(model, x, target, maps, absolute)
    n, _, h, w = x.shape
    flat, a_flat = x.flatten(1), a.flatten(1)
    if patch_size is not None:
        blocks = _block_map(h, w, int(patch_size), x.device)
        count = (h // int(patch_size)) * (w // int(patch_size))
        sums = _block_sums(a, blocks, count)
        values = replacement_values(
            x,
            baseline,
            (count, n),
            uniform_low=uniform_low,
            uniform_high=uniform_high,
            draws=draws,
            generator=generator,
        )

        def build(k0: int, k1: int) -> Tensor:
            kk = torch.arange(k0, k1, device=x.device)
            hit = (blocks[None] == kk[:, None, None])[:, None, None]  # (L, 1, 1, H, W)
            return torch.where(hit, values[k0:k1, :, None, None, None], x[None])

    else:
        if runs < 2 or not 1 <= subset_size <= flat.shape[1]:
            raise ValueError(f"needs runs >= 2 and 1 <= subset_size <= {flat.shape[1]}, got {runs}, {subset_size}")
        count = runs
        if subsets is None:
            weights = torch.ones(n, flat.shape[1], dtype=torch.float32)
            subsets = torch.stack(
                [torch.multinomial(weights, subset_size, replacement=False, generator=generator) for _ in range(runs)]
            )
        subsets = subsets.to(device=x.device, dtype=torch.long)
        if tuple(subsets.shape) != (runs, n, subset_size):
            raise ValueError(f"subsets must have shape {(runs, n, subset_size)}, got {tuple(subsets.shape)}")
        sums = a_flat[None].expand(runs, -1, -1).gather(2, subsets).sum(2).T  # (N, runs)
        values = replacement_values(
            x,
            baseline,
            (runs, n),
            uniform_low=uniform_low,
            uniform_high=uniform_high,
            draws=draws,
            generator=generator,
        )

        def build(k0: int, k1: int) -> Tensor:
            idx = subsets[k0:k1]
            src = values[k0:k1, :, None].expand(-1, -1, idx.shape[2])
            return flat[None].expand(k1 - k0, -1, -1).scatter(2, idx, src).view(k1 - k0, *x.shape)

    y0 = target_scores(model, x, t, batch_size=batch_size)
    y = perturbed_scores(model, t, count, build, batch_size=batch_size, should_stop=should_stop)
    return pearson(sums, y0[:, None] - y)


def _steps_by_rank(a_flat: Tensor, features_in_step: int, descending: bool) -> tuple[Tensor, int]:
    """The step each feature is perturbed in when features go in sorted order, ``features_in_step`` at a
    time (ties by index): (N, F) step indices, number of steps."""
    if features_in_step < 1:
        raise ValueError(f"features_in_step must be >= 1, got {features_in_step}")
    order = a_flat.sort(dim=1, descending=descending, stable=True).indices
    ranks = torch.arange(a_flat.shape[1], device=a_flat.device) // features_in_step
    step = torch.empty_like(order).scatter_(1, order, ranks[None].expand_as(order))
    return step, math.ceil(a_flat.shape[1] / features_in_step)


@keeps_model
def faithfulness_estimate(
    model: nn.Module,
    x: Tensor,
    target,
    maps: Tensor,
    *,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    uniform_low: float = 0.0,
    uniform_high: float = 1.0,
    absolute: bool = False,
    draws: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    should_stop: ShouldStop = None,
) -> Tensor:
    """Faithfulness estimate (Alvarez-Melis and Jaakkola 2018), as Quantus ``FaithfulnessEstimate``.
    **Higher is better.**

    The features (channel x pixel entries) in decreasing attribution order (ties by index; Quantus's numpy
    quicksort orders ties arbitrarily), ``features_in_step`` at a time: each group alone is replaced by
    ``baseline``; Pearson correlation, per image, of the group's attribution sum with the drop
    f(x) - f(x') of the target logit. draws: (steps, N) replacement values for ``uniform``.
    Returns (N,) in [-1, 1].
    """
    x, t, a = _prepare(model, x, target, maps, absolute)
    n = x.shape[0]
    flat, a_flat = x.flatten(1), a.flatten(1)
    step, count = _steps_by_rank(a_flat, features_in_step, descending=True)
    sums = torch.zeros(n, count, dtype=x.dtype, device=x.device).scatter_add_(1, step, a_flat)
    values = replacement_values(
        x,
        baseline,
        (count, n),
        uniform_low=uniform_low,
        uniform_high=uniform_high,
        draws=draws,
        generator=generator,
    )

    def build(k0: int, k1: int) -> Tensor:
        kk = torch.arange(k0, k1, device=x.device)
        hit = step[None] == kk[:, None, None]  # (L, N, F)
        return torch.where(hit, values[k0:k1, :, None], flat[None]).view(k1 - k0, *x.shape)

    y0 = target_scores(model, x, t, batch_size=batch_size)
    y = perturbed_scores(model, t, count, build, batch_size=batch_size, should_stop=should_stop)
    return pearson(sums, y0[:, None] - y)


@keeps_model
def monotonicity_correlation(
    model: nn.Module,
    x: Tensor,
    target,
    maps: Tensor,
    *,
    samples: int = 100,
    features_in_step: int = 1,
    baseline: Baseline = "uniform",
    uniform_low: float = 0.0,
    uniform_high: float = 1.0,
    absolute: bool = True,
    eps: float = 1e-5,
    score: str = "probability",
    draws: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    should_stop: ShouldStop = None,
) -> Tensor:
    """Monotonicity correlation (Nguyen and Martinez 2020), as Quantus ``MonotonicityCorrelation``.
    **Higher is better.**

    The features in increasing attribution order (|maps| with ``absolute``, Quantus's default; ties by
    index), ``features_in_step`` at a time: each group alone is replaced ``samples`` times by ``baseline``
    (with ``uniform``, a fresh value per image and sample); the group's variance is
    mean_samples (f(x') - f(x))^2 / f(x)^2 (1 / f(x)^2 replaced by 1 where |f(x)| < eps). Spearman
    correlation, per image, of the group's attribution sum with its variance. f: the target's softmax
    probability (``score="probability"``, Quantus's default for this metric, which the published table
    keeps) or its logit (``score="logit"``). draws: (steps, samples, N) replacement values for ``uniform``.
    Returns (N,) in [-1, 1].
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    x, t, a = _prepare(model, x, target, maps, absolute)
    n = x.shape[0]
    flat, a_flat = x.flatten(1), a.flatten(1)
    step, count = _steps_by_rank(a_flat, features_in_step, descending=False)
    sums = torch.zeros(n, count, dtype=x.dtype, device=x.device).scatter_add_(1, step, a_flat)
    values = replacement_values(
        x,
        baseline,
        (count, samples, n),
        uniform_low=uniform_low,
        uniform_high=uniform_high,
        draws=draws,
        generator=generator,
    ).reshape(count * samples, n)

    def build(k0: int, k1: int) -> Tensor:
        kk = torch.arange(k0, k1, device=x.device) // samples
        hit = step[None] == kk[:, None, None]
        return torch.where(hit, values[k0:k1, :, None], flat[None]).view(k1 - k0, *x.shape)

    y0 = target_scores(model, x, t, score=score, batch_size=batch_size)
    y = perturbed_scores(model, t, count * samples, build, score=score, batch_size=batch_size, should_stop=should_stop)
    inv = torch.where(y0.abs() >= eps, 1 / y0.abs(), torch.ones_like(y0)) ** 2
    variance = ((y.view(n, count, samples) - y0[:, None, None]) ** 2).mean(2) * inv[:, None]
    return spearman(sums, variance)
