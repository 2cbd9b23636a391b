"""Evaluation metrics for attribution maps and counterfactuals, batched and on the inputs' device.

An *explain* function maps ``(model, x, target) -> maps``: x (N, C, H, W), target (N,) int64, maps
(N, C, H, W) (see :mod:`excitation_pullbacks.baselines`). Every metric returns per-sample tensors, so a table
entry is a mean over images.

- :func:`deletion`, :func:`insertion`: target score as top-attributed pixels are removed / revealed; AUC.
- :func:`randomization_check`: cascading model-parameter randomization (Adebayo et al. 2018) with
  :func:`spearman` and :func:`ssim` (Wang et al. 2004) similarities.
- :func:`ascent_scores`, :func:`transfer_scores`, :func:`transfer`: logit gain and top-1 flips of
  counterfactuals, on the model that made them or on others.
- :func:`high_frequency_energy`, :func:`total_variation`: weights-free structure of a map or perturbation.

Only torch is imported here.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Explain", "deletion", "insertion", "perturbation_curves", "pixel_scores", "gaussian_blur",
    "spearman", "ssim", "RandomizationResult", "randomization_check", "randomization_layers", "AscentScores", "ascent_scores",
    "transfer_scores", "TransferResult", "transfer", "high_frequency_energy", "total_variation",
]

Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]
Baseline = Union[str, float, int, Tensor]

# ----------------------------------------------------------------------------------------------------------
# Deletion and insertion
# ----------------------------------------------------------------------------------------------------------


def _targets(target, n: int, device) -> Tensor:
    t = torch.as_tensor(target, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.is_floating_point() or t.shape != (n,):
        raise ValueError(f"target must be N = {n} integer class indices, got {tuple(t.shape)} {t.dtype}")
    return t.long()


def _warn_if_training(model: nn.Module) -> None:
    if any(m.training for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.Dropout))):
        warnings.warn("the model is in training mode (BatchNorm batch statistics make each image's score depend "
                      "on the others in its chunk); call model.eval() first", stacklevel=3)


def pixel_scores(maps: Tensor, *, reduce: str = "sum") -> Tensor:
    """Per-pixel attribution: maps (N, C, H, W) or (N, H, W) -> (N, H, W).

    reduce: ``sum`` (signed sum over channels: pixels with the most positive evidence rank first) or
    ``abs_sum`` (sum of absolute values: evidence of either sign).
    """
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4:
        raise ValueError(f"maps must have shape (N, C, H, W) or (N, H, W), got {tuple(maps.shape)}")
    if reduce == "sum":
        return maps.sum(1)
    if reduce == "abs_sum":
        return maps.abs().sum(1)
    raise ValueError(f"unknown reduce {reduce!r}; choose sum or abs_sum")


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
    r = int(math.ceil(3 * sigma)) if radius is None else int(radius)
    d = torch.arange(-r, r + 1, device=x.device, dtype=torch.float64)
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    h, w = x.shape[-2:]
    return _blur_matrix(h, k, r) @ x @ _blur_matrix(w, k, r).T


def _baseline_images(x: Tensor, baseline: Baseline, blur_sigma: float) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
    if isinstance(baseline, str):
        if baseline == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        if baseline == "blur":
            return gaussian_blur(x, sigma=blur_sigma)
        raise ValueError(f"unknown baseline {baseline!r}; choose blur, mean, a number or a tensor")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    raise ValueError(f"unknown baseline {baseline!r}; choose blur, mean, a number or a tensor")


def perturbation_curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target,
    *,
    mode: str,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: str = "probability",
    reduce: str = "sum",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Target score along deletion or insertion of pixels in decreasing attribution order.

    x: (N, C, H, W) images; maps: (N, C', H, W) or (N, H, W), reduced per pixel by ``reduce`` (see
    :func:`pixel_scores`); target: (N,) class indices (or one int). Pixels are ranked per image by
    decreasing score, ties by increasing flat index (h * W + w). After step k of ``steps`` the first
    floor(k * H * W / steps) ranked pixels (all channels) are taken from the baseline (``mode="deletion"``:
    the rest from x) or from x (``mode="insertion"``: the rest from the baseline).
    baseline: ``blur`` (:func:`gaussian_blur` of x with ``blur_sigma`` pixels), ``mean`` (each image's
    per-channel mean), a number, or a tensor broadcastable to x.
    score: ``probability`` (softmax of the logits at the target) or ``logit``.
    All N * (steps + 1) perturbed images are built on the fly and scored ``batch_size`` at a time (no grad).
    Returns (curves (N, steps + 1), fractions (steps + 1,)): point 0 is the unperturbed start (x for
    deletion, the baseline for insertion), fractions[k] = the fraction of pixels changed after step k.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be probability or logit, got {score!r}")
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    p, steps = h * w, int(steps)
    s = pixel_scores(maps.detach().to(x.device), reduce=reduce)
    if s.shape != (n, h, w):
        raise ValueError(f"maps {tuple(maps.shape)} do not match images {tuple(x.shape)}")
    t = _targets(target, n, x.device)
    _warn_if_training(model)
    x = x.detach()
    base = _baseline_images(x, baseline, blur_sigma)
    order = torch.sort(s.reshape(n, p), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=x.device).expand(n, p))
    counts = torch.arange(steps + 1, device=x.device) * p // steps  # pixels changed after each step
    total = n * (steps + 1)
    out: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, total, int(batch_size)):
            j = torch.arange(start, min(start + int(batch_size), total), device=x.device)
            i, k = j // (steps + 1), j % (steps + 1)
            # 1 where the pixel is changed; lerp with weights 0 / 1 returns either end exactly
            changed = (rank.index_select(0, i) < counts[k, None]).to(x.dtype).view(-1, 1, h, w)
            start_img, end_img = (x, base) if mode == "deletion" else (base, x)
            xi = torch.lerp(start_img.index_select(0, i), end_img.index_select(0, i), changed)
            logits = model(xi)
            if score == "probability":
                logits = logits.softmax(1)
            out.append(logits.gather(1, t[i, None])[:, 0])
    curves = torch.cat(out).view(n, steps + 1)
    return curves, counts.to(curves.dtype) / p


def _auc(curves: Tensor, fractions: Tensor, include_start: bool, auc_spacing: str) -> tuple[Tensor, Tensor]:
    if not include_start:
        curves, fractions = curves[:, 1:], fractions[1:]
    if auc_spacing == "fraction":
        auc = torch.trapezoid(curves, fractions, dim=1)
    elif auc_spacing == "step":
        auc = torch.trapezoid(curves, dx=1.0, dim=1)
    else:
        raise ValueError(f"auc_spacing must be fraction or step, got {auc_spacing!r}")
    return auc, curves


def deletion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target,
    *,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: str = "probability",
    reduce: str = "sum",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    include_start: bool = True,
    auc_spacing: str = "fraction",
    return_curves: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Deletion AUC: the target score as top-attributed pixels are replaced by the baseline.

    x: (N, C, H, W); maps: (N, C', H, W) or (N, H, W); target: (N,). Options as in
    :func:`perturbation_curves`. Returns the AUC (N,) by the trapezoid rule over the fraction of pixels
    deleted, in [0, 1] (``auc_spacing="fraction"``; ``"step"``: spacing 1 per step), and with
    ``return_curves`` also the curves (N, steps + 1), or (N, steps) with ``include_start=False`` (the
    unperturbed point left out of curve and AUC). **Lower is better** (more faithful): the score falls
    fast as the pixels the map ranks first are removed.

    Quantus ``PixelFlipping(features_in_step=C * H * W // steps, perturb_baseline=b, abs=False,
    normalise=False, return_auc_per_sample=True)`` with maps channel-reduced to (N, 1, H, W) gives
    ``deletion(..., baseline=b, reduce="sum", include_start=False, auc_spacing="step")`` (for a constant
    b; Quantus's ``"mean"`` is the mean over all features of the partly perturbed image, recomputed each
    step, ours is the original image's per-channel mean).
    """
    curves, fractions = perturbation_curves(
        model, x, maps, target, mode="deletion", steps=steps, baseline=baseline, score=score, reduce=reduce,
        blur_sigma=blur_sigma, batch_size=batch_size,
    )
    auc, curves = _auc(curves, fractions, include_start, auc_spacing)
    return (auc, curves) if return_curves else auc


def insertion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target,
    *,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: str = "probability",
    reduce: str = "sum",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    include_start: bool = True,
    auc_spacing: str = "fraction",
    return_curves: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Insertion AUC: the target score as top-attributed pixels of x are revealed on the baseline.

    Arguments and returns as :func:`deletion` (point 0 of the curve is the baseline image). **Higher is
    better** (more faithful): the score rises fast as the pixels the map ranks first are revealed.
    """
    curves, fractions = perturbation_curves(
        model, x, maps, target, mode="insertion", steps=steps, baseline=baseline, score=score, reduce=reduce,
        blur_sigma=blur_sigma, batch_size=batch_size,
    )
    auc, curves = _auc(curves, fractions, include_start, auc_spacing)
    return (auc, curves) if return_curves else auc


# ----------------------------------------------------------------------------------------------------------
# Similarities and the randomization check
# ----------------------------------------------------------------------------------------------------------


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks (0-based) along dim 1 with ties given their mean rank, as scipy.stats.rankdata."""
    s = v.sort(dim=1).values.contiguous()
    less = torch.searchsorted(s, v.contiguous(), side="left")
    leq = torch.searchsorted(s, v.contiguous(), side="right")
    return (less + leq - 1).to(torch.float64 if v.dtype == torch.float64 else torch.float32) / 2


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
    d = torch.arange(-r, r + 1, device=a.device, dtype=torch.float64)
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    k = (k / k.sum()).to(a.dtype)

    def filt(z: Tensor) -> Tensor:  # "valid" separable Gaussian filter
        z = F.conv2d(z.reshape(n * c, 1, h, w), k.view(1, 1, -1, 1))
        return F.conv2d(z, k.view(1, 1, 1, -1))

    ux, uy = filt(a), filt(b)
    vx, vy, vxy = filt(a * a) - ux * ux, filt(b * b) - uy * uy, filt(a * b) - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)


def _minmax(v: Tensor) -> Tensor:
    lo = v.flatten(1).min(1).values.view(-1, *(1,) * (v.dim() - 1))
    hi = v.flatten(1).max(1).values.view(-1, *(1,) * (v.dim() - 1))
    return (v - lo) / (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)


@dataclass
class RandomizationResult:
    """Cascading randomization: ``layers`` (L,) in the order randomised (top first, each step keeps the
    earlier ones randomised); ``spearman`` and ``ssim`` (L, N) similarity of each step's maps to the original
    maps (None when not requested); ``original`` (N, C, H, W) the maps of the unmodified model.
    Lower similarity after randomization: the method depends on the parameters (passes the check)."""

    layers: list[str]
    spearman: Tensor | None
    ssim: Tensor | None
    original: Tensor


def _parameterised_layers(model: nn.Module, x: Tensor, batchnorm: str) -> list[str]:
    """Names of modules holding parameters of their own, in the order of their first forward call."""
    named = [(name, m) for name, m in model.named_modules() if _own_parameters(m)]
    if batchnorm == "skip":
        named = [(name, m) for name, m in named if not isinstance(m, nn.modules.batchnorm._NormBase)]
    called: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: called.append(name)) for name, m in named]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hd in handles:
            hd.remove()
    seen: list[str] = []
    for name in called:
        if name not in seen:
            seen.append(name)
    return seen


def randomization_layers(model: nn.Module, x: Tensor, *, layers: int | Sequence[str] | None = None,
                         batchnorm: str = "skip") -> list[str]:
    """The layer names :func:`randomization_check` randomises, in its order (top first). x: (N, C, H, W), one
    image is run to order the layers by their first call; layers and batchnorm as there."""
    if batchnorm not in ("skip", "reset"):
        raise ValueError(f"batchnorm must be skip or reset, got {batchnorm!r}")
    available = _parameterised_layers(model, x.detach(), batchnorm)
    if layers is None:
        return available[::-1]
    if isinstance(layers, int):
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        return available[::-1][:layers]
    names = list(layers)
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"unknown layer names {missing}; parameterised layers: {available}")
    return names


def _own_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _reinitialise(module: nn.Module, batchnorm: str) -> None:
    """Re-initialise every module under ``module`` (itself included) that holds parameters of its own."""
    for m in module.modules():
        if not _own_parameters(m):
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if batchnorm == "reset":
                m.reset_parameters()
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
        else:
            with torch.no_grad():
                for p in m.parameters(recurse=False):
                    std = float(p.std()) if p.numel() > 1 else 0.0
                    p.normal_(0.0, std if std > 0 else 1.0)


def _similarities(ref_abs: Tensor, ref_unit: Tensor, maps: Tensor, which: Sequence[str]) -> dict[str, Tensor]:
    m = maps.abs().sum(1)
    out = {}
    if "spearman" in which:
        out["spearman"] = spearman(ref_abs, m)
    if "ssim" in which:
        out["ssim"] = ssim(ref_unit, _minmax(m), data_range=1.0)
    return out


def randomization_check(
    model: nn.Module,
    x: Tensor,
    target,
    explain: Explain,
    *,
    layers: int | Sequence[str] | None = None,
    similarity: Sequence[str] = ("spearman", "ssim"),
    seed: int = 0,
    batchnorm: str = "skip",
) -> RandomizationResult:
    """Cascading model-parameter randomization (Adebayo et al. 2018), from the output layer to the input.

    model: images -> logits; x: (N, C, H, W); target: (N,); explain(model, x, target) -> (N, C, H, W).
    Works on a deep copy: the user's model is never modified. The parameterised layers (modules holding
    parameters of their own) are ordered by their first call in a forward pass on x[:1] and re-initialised
    one at a time from the last called towards the input, cumulatively; after each step the maps are
    recomputed. layers: None (all), an int k (the top k), or module names in the order to randomise (a
    block's name re-initialises every parameterised module in it at once).
    Re-initialisation: the module's ``reset_parameters()`` (PyTorch's default init, e.g. Kaiming-uniform
    for Conv/Linear) with the RNG seeded by ``seed + step`` (the caller's RNG state is left as it was);
    a module without it gets N(0, s^2) draws, s its parameter's std (1 if 0).
    batchnorm: ``skip`` (default: BatchNorm layers stay as trained, affine parameters and running
    statistics, so the cascade walks the conv / linear layers) or ``reset`` (BatchNorm layers are steps
    too: ``reset_parameters()`` sets weight 1, bias 0, running mean 0, running var 1). Quantus's
    ``ModelParameterRandomisation`` resets every module with ``reset_parameters`` (BatchNorm included, as
    ``reset``) in reverse registration order, reseeding the global RNG with the same seed at each step.
    similarity: any of ``spearman`` (:func:`spearman` of the absolute channel-summed maps) and ``ssim``
    (:func:`ssim` of the absolute channel-summed maps, each min-max scaled to [0, 1]).
    Returns a :class:`RandomizationResult` with (L, N) tensors. **Lower** similarity after randomization
    means the maps depend on the parameters (the method passes the check); high similarity fails it.
    """
    which = tuple(similarity)
    unknown = set(which) - {"spearman", "ssim"}
    if unknown or not which:
        raise ValueError(f"similarity must be a non-empty subset of spearman, ssim; got {which}")
    if batchnorm not in ("skip", "reset"):
        raise ValueError(f"batchnorm must be skip or reset, got {batchnorm!r}")
    t = _targets(target, x.shape[0], x.device)
    x = x.detach()
    work = copy.deepcopy(model)
    names = randomization_layers(work, x, layers=layers, batchnorm=batchnorm)
    modules = dict(work.named_modules())
    original = explain(work, x, t).detach()
    ref_abs = original.abs().sum(1)
    ref_unit = _minmax(ref_abs)
    rows: dict[str, list[Tensor]] = {k: [] for k in which}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    for step, name in enumerate(names):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + step)
            _reinitialise(modules[name], batchnorm)
        maps = explain(work, x, t).detach()
        for k, v in _similarities(ref_abs, ref_unit, maps, which).items():
            rows[k].append(v)
    n = x.shape[0]

    def stack(k: str) -> Tensor | None:
        if k not in rows:
            return None
        return torch.stack(rows[k]) if rows[k] else torch.empty(0, n, device=x.device)

    return RandomizationResult(layers=names, spearman=stack("spearman"), ssim=stack("ssim"), original=original)


# ----------------------------------------------------------------------------------------------------------
# Counterfactuals: ascent scores and transfer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AscentScores:
    """Per-sample scores of counterfactuals x_adv of x toward ``target``, all (N,):

    gain: logit_target(x_adv) - logit_target(x); l2: ||x_adv - x||_2; gain_per_l2: gain / l2 (NaN where
    l2 = 0); flipped: 1.0 where the top-1 class of x was not the target and that of x_adv is, 0.0 where it
    was not and is not, NaN where x was already classified as the target (not counted);
    before, after: top-1 classes of x and x_adv. Higher gain, gain_per_l2 and flip rate: a stronger
    counterfactual."""

    gain: Tensor
    l2: Tensor
    gain_per_l2: Tensor
    flipped: Tensor
    before: Tensor
    after: Tensor

    @property
    def flip_rate(self) -> float:
        """Fraction of the eligible samples (x not already the target) whose top-1 became the target."""
        v = self.flipped[~torch.isnan(self.flipped)]
        return float(v.mean()) if v.numel() else math.nan


def _logits(model: nn.Module, x: Tensor, batch_size: int | None) -> Tensor:
    step = batch_size or x.shape[0]
    with torch.no_grad():
        return torch.cat([model(x[i : i + step]) for i in range(0, x.shape[0], step)])


def _flatten_grid(x: Tensor, x_adv: Tensor, target) -> tuple[Tensor, Tensor, Tensor]:
    if x_adv.dim() == x.dim() + 1:  # (N, K, C, H, W) from ascent on a target grid
        k = x_adv.shape[1]
        x = x[:, None].expand(-1, k, *x.shape[1:]).reshape(-1, *x.shape[1:])
        x_adv = x_adv.reshape(-1, *x_adv.shape[2:])
        target = torch.as_tensor(target, device=x.device).reshape(-1)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv {tuple(x_adv.shape)} does not match x {tuple(x.shape)}")
    return x, x_adv, _targets(target, x.shape[0], x.device)


def ascent_scores(model: nn.Module, x: Tensor, x_adv: Tensor, target, *, batch_size: int | None = None) -> AscentScores:
    """Scores of counterfactuals: x (N, C, H, W), x_adv (N, C, H, W) made toward target (N,) -> AscentScores
    with (N,) tensors. x_adv (N, K, C, H, W) with target (N, K) (an ascent grid) gives (N * K,) rows in
    row-major order. batch_size: images per forward (None: all). See :class:`AscentScores`."""
    x, x_adv, t = _flatten_grid(x.detach(), x_adv.detach(), target)
    before, after = _logits(model, x, batch_size), _logits(model, x_adv, batch_size)
    gain = (after.gather(1, t[:, None]) - before.gather(1, t[:, None]))[:, 0]
    l2 = (x_adv - x).flatten(1).norm(dim=1).to(gain.dtype)
    per = torch.where(l2 > 0, gain / l2.clamp_min(torch.finfo(l2.dtype).tiny), torch.full_like(gain, math.nan))
    top0, top1 = before.argmax(1), after.argmax(1)
    flipped = (top1 == t).to(gain.dtype)
    flipped = torch.where(top0 == t, torch.full_like(flipped, math.nan), flipped)
    return AscentScores(gain=gain, l2=l2, gain_per_l2=per, flipped=flipped, before=top0, after=top1)


def transfer_scores(models: Mapping[str, nn.Module], x: Tensor, x_adv: Tensor, target, *,
                    batch_size: int | None = None) -> dict[str, AscentScores]:
    """:func:`ascent_scores` of precomputed counterfactuals x_adv (N, C, H, W) on each model: name -> scores
    with (N,) tensors (gain: target logit gain on that model; flipped: its top-1 became the target)."""
    return {name: ascent_scores(m, x, x_adv, target, batch_size=batch_size) for name, m in models.items()}


@dataclass
class TransferResult:
    """x_adv (N, C, H, W): the counterfactuals made on the source model; scores: model name -> AscentScores."""

    x_adv: Tensor
    scores: dict[str, AscentScores]


def transfer(
    source_model: nn.Module,
    target_models: Mapping[str, nn.Module],
    x: Tensor,
    target,
    *,
    steps: int = 10,
    step_size: float = 20.0,
    eps: float = 100.0,
    vanilla: bool = False,
    direction: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int | None = None,
    **ascent_options,
) -> TransferResult:
    """Counterfactuals made on ``source_model`` and scored on each of ``target_models``.

    x: (N, C, H, W) in [-1, 1]; target: (N,). The counterfactuals are
    ``excitation_pullbacks.ascent(source_model, x, target, steps=..., step_size=..., eps=..., vanilla=...,
    direction=..., **ascent_options)`` (L2 budget ``eps``); each target model scores them with
    :func:`ascent_scores` (include the source in ``target_models`` to score it too). Higher gain / flip rate
    on another model: the counterfactual transfers.
    """
    from .pullback import ascent

    t = _targets(target, x.shape[0], x.device)
    x_adv = ascent(source_model, x, t, steps=steps, step_size=step_size, eps=eps, vanilla=vanilla,
                   direction=direction, **ascent_options)
    return TransferResult(x_adv=x_adv, scores=transfer_scores(target_models, x, x_adv, t, batch_size=batch_size))


# ----------------------------------------------------------------------------------------------------------
# Structure proxies
# ----------------------------------------------------------------------------------------------------------


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
    tv = (maps[..., 1:, :] - maps[..., :-1, :]).abs().flatten(1).sum(1) + \
        (maps[..., :, 1:] - maps[..., :, :-1]).abs().flatten(1).sum(1)
    if not normalize:
        return tv
    return tv / maps.abs().flatten(1).sum(1)
