"""Shared pieces of the perturbation metrics: maps shaped like the images, replacement values drawn as
Quantus draws them, and target scores (logits or probabilities) of many perturbed images in chunks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..stopping import ShouldStop, check_stop

__all__ = ["Baseline", "expand_maps", "perturbed_scores", "replacement_values", "target_scores"]

#: What replaces perturbed features: ``uniform`` (one value per image and perturbation, drawn from
#: U(uniform_low, uniform_high)), ``black`` / ``white`` (the image's minimum / maximum over all its
#: features), ``mean`` (the image's mean) or a number.
Baseline = str | float | int


def expand_maps(maps: Tensor, x: Tensor, *, absolute: bool = False) -> Tensor:
    """maps (N, C', H, W) with C' in {1, C}, or (N, H, W) -> (N, C, H, W) in x's dtype (a one-channel map is
    repeated over the channels, as Quantus broadcasts it); ``absolute`` takes |maps|."""
    if maps.dim() == x.dim() - 1:
        maps = maps[:, None]
    if maps.dim() != x.dim() or maps.shape[0] != x.shape[0] or maps.shape[2:] != x.shape[2:]:
        raise ValueError(f"maps of shape {tuple(maps.shape)} do not fit images of shape {tuple(x.shape)}")
    if maps.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"maps must have 1 or {x.shape[1]} channels, got {maps.shape[1]}")
    maps = maps.detach().to(device=x.device, dtype=x.dtype).expand_as(x)
    return maps.abs() if absolute else maps


def replacement_values(
    x: Tensor,
    baseline: Baseline,
    shape: tuple[int, ...],
    *,
    uniform_low: float,
    uniform_high: float,
    draws: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Replacement values for ``shape`` = (..., N) perturbations of the N images x (N, C, H, W).

    ``uniform``: ``draws`` (that shape, the values in the order Quantus draws them with numpy:
    ``np.random.uniform(low, high, shape)`` after the same seed reproduces a Quantus run) or fresh draws
    from ``generator``. Other baselines ignore draws and give one constant per image. Returns ``shape``.
    """
    n = x.shape[0]
    if shape[-1] != n:
        raise ValueError(f"replacement values need a last dimension of {n} images, got shape {shape}")
    flat = x.flatten(1)
    if isinstance(baseline, str):
        if baseline == "uniform":
            if draws is not None:
                if tuple(draws.shape) != tuple(shape):
                    raise ValueError(f"draws must have shape {tuple(shape)}, got {tuple(draws.shape)}")
                return draws.to(device=x.device, dtype=x.dtype)
            u = torch.rand(shape, generator=generator, dtype=x.dtype, device="cpu" if generator else x.device)
            return (uniform_low + (uniform_high - uniform_low) * u).to(x.device)
        per_image = {
            "black": lambda: flat.min(1).values,
            "white": lambda: flat.max(1).values,
            "mean": lambda: flat.mean(1),
        }
        if baseline not in per_image:
            raise ValueError(f"unknown baseline {baseline!r}; choose uniform, black, white, mean or a number")
        return per_image[baseline]().expand(shape)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full(shape, float(baseline), dtype=x.dtype, device=x.device)
    raise ValueError(f"unknown baseline {baseline!r}; choose uniform, black, white, mean or a number")


def _score(logits: Tensor, target: Tensor, score: str) -> Tensor:
    if score == "probability":
        logits = logits.softmax(1)
    elif score != "logit":
        raise ValueError(f"score must be logit or probability, got {score!r}")
    return logits.gather(1, target[:, None])[:, 0]


def target_scores(
    model: nn.Module, x: Tensor, target: Tensor, *, score: str = "logit", batch_size: int | None = None
) -> Tensor:
    """The ``target`` (M,) logit or softmax probability (``score``) for images x (M, C, H, W), ``batch_size``
    images per forward pass (None: all); no gradients. Returns (M,)."""
    step = batch_size or x.shape[0]
    with torch.no_grad():
        return torch.cat(
            [_score(model(x[i : i + step]), target[i : i + step], score) for i in range(0, x.shape[0], step)]
        )


def perturbed_scores(
    model: nn.Module,
    target: Tensor,
    count: int,
    build: Callable[[int, int], Tensor],
    *,
    score: str = "logit",
    batch_size: int,
    should_stop: ShouldStop = None,
) -> Tensor:
    """Target scores (:func:`target_scores`) of ``count`` perturbations of N images: ``build(k0, k1)`` returns perturbations k0..k1-1
    as (k1 - k0, N, C, H, W); about ``batch_size`` images (at least N) go through the model at a time.
    target: (N,). Returns (N, count)."""
    n = target.shape[0]
    per = max(1, batch_size // n)
    out = []
    with torch.no_grad():
        for k0 in range(0, count, per):
            check_stop(should_stop)
            k1 = min(count, k0 + per)
            images = build(k0, k1)
            logits = model(images.reshape(-1, *images.shape[2:]))
            out.append(_score(logits, target.repeat(k1 - k0), score).view(k1 - k0, n))
    return torch.cat(out).T if out else torch.empty(n, 0)
