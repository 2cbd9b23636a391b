"""Deletion and insertion: the target score as top-attributed pixels are removed from / revealed on a
baseline image, and the area under that curve."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import class_targets, warn_if_training
from ..state import preserved_model
from ..stopping import ShouldStop, check_stop
from .filters import gaussian_blur

__all__ = ["Baseline", "deletion", "insertion", "perturbation_auc", "perturbation_curves", "pixel_scores"]

Baseline = str | float | int | Tensor


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
    should_stop: ShouldStop = None,
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
    should_stop: called before each batch; True ends the call with :class:`~excitation_pullbacks.stopping.Stopped`.
    The model is left as it was (:func:`~excitation_pullbacks.state.preserved_model`).
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
    n, _, h, w = x.shape
    p, steps = h * w, int(steps)
    s = pixel_scores(maps.detach().to(x.device), reduce=reduce)
    if s.shape != (n, h, w):
        raise ValueError(f"maps {tuple(maps.shape)} do not match images {tuple(x.shape)}")
    t = class_targets(target, n, x.device, grid=False)
    warn_if_training(model)
    x = x.detach()
    base = _baseline_images(x, baseline, blur_sigma)
    order = torch.sort(s.reshape(n, p), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=x.device).expand(n, p))
    counts = torch.arange(steps + 1, device=x.device) * p // steps  # pixels changed after each step
    total = n * (steps + 1)
    out: list[Tensor] = []
    with torch.no_grad(), preserved_model(model):
        for start in range(0, total, int(batch_size)):
            check_stop(should_stop)
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


def perturbation_auc(
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
    include_start: bool = True,
    auc_spacing: str = "fraction",
    return_curves: bool = False,
    should_stop: ShouldStop = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Area under the deletion or insertion curve (``mode``): what :func:`deletion` and :func:`insertion` return.

    x: (N, C, H, W); maps: (N, C', H, W) or (N, H, W); target: (N,). Options as in
    :func:`perturbation_curves`. Returns the AUC (N,) by the trapezoid rule over the fraction of pixels
    changed, in [0, 1] (``auc_spacing="fraction"``; ``"step"``: spacing 1 per step), and with
    ``return_curves`` also the curves (N, steps + 1), or (N, steps) with ``include_start=False`` (the
    unperturbed point left out of curve and AUC).
    """
    curves, fractions = perturbation_curves(
        model,
        x,
        maps,
        target,
        mode=mode,
        steps=steps,
        baseline=baseline,
        score=score,
        reduce=reduce,
        blur_sigma=blur_sigma,
        batch_size=batch_size,
        should_stop=should_stop,
    )
    auc, curves = _auc(curves, fractions, include_start, auc_spacing)
    return (auc, curves) if return_curves else auc


def deletion(model: nn.Module, x: Tensor, maps: Tensor, target, **options) -> Tensor | tuple[Tensor, Tensor]:
    """Deletion AUC: the target score as top-attributed pixels are replaced by the baseline.

    Arguments and returns as :func:`perturbation_auc` (options: steps, baseline, score, reduce, blur_sigma,
    batch_size, include_start, auc_spacing, return_curves, should_stop). **Lower is better** (more faithful): the score
    falls fast as the pixels the map ranks first are removed.

    Quantus ``PixelFlipping(features_in_step=C * H * W // steps, perturb_baseline=b, abs=False,
    normalise=False, return_auc_per_sample=True)`` with maps channel-reduced to (N, 1, H, W) gives
    ``deletion(..., baseline=b, reduce="sum", include_start=False, auc_spacing="step")`` (for a constant
    b; Quantus's ``"mean"`` is the mean over all features of the partly perturbed image, recomputed each
    step, ours is the original image's per-channel mean).
    """
    return perturbation_auc(model, x, maps, target, mode="deletion", **options)


def insertion(model: nn.Module, x: Tensor, maps: Tensor, target, **options) -> Tensor | tuple[Tensor, Tensor]:
    """Insertion AUC: the target score as top-attributed pixels of x are revealed on the baseline.

    Arguments and returns as :func:`perturbation_auc` (point 0 of the curve is the baseline image).
    **Higher is better** (more faithful): the score rises fast as the pixels the map ranks first are revealed.
    """
    return perturbation_auc(model, x, maps, target, mode="insertion", **options)
