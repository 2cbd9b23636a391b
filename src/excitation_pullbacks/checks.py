"""Checks shared by the core: images against the model, class targets, and the model's mode.

Each raises a ValueError naming what is wrong (or warns), so that callers fail before any forward pass; the
core reports a wrong argument as a ValueError also where its type is wrong (ruff TRY004 is waived for that).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["captum_targets", "check_class_range", "check_finite", "check_images", "class_targets", "warn_if_training"]


def _first(model: nn.Module, types) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, types)), None)


def check_images(model: nn.Module, images: Tensor) -> None:
    """Raise ValueError unless ``images`` fits the model's first layer: (N, C, H, W) for a conv net, (N, F) for
    an MLP; a non-empty, finite, floating-point tensor."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a tensor, got {type(images).__name__}")  # noqa: TRY004
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")
    first = _first(model, nn.Conv2d) or _first(model, nn.Linear)  # any conv: the input is an image
    if isinstance(first, nn.Conv2d):
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[1] != first.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels but the model's first convolution takes {first.in_channels}"
            )
    elif isinstance(first, nn.Linear) and (images.dim() < 2 or images.shape[-1] != first.in_features):
        raise ValueError(f"inputs must have shape (N, {first.in_features}) for this model, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    check_finite(images)


def check_finite(images: Tensor) -> None:
    """Raise ValueError when ``images`` holds a NaN or an infinity."""
    if not _all_finite(images):
        raise ValueError("images contain NaN or infinite values")


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite: a NaN or infinity makes the sum non-finite, so one reduction decides
    (torch.isfinite is several passes); only a sum that overflows from finite values is checked entry by entry."""
    return math.isfinite(x.detach().sum().item()) or bool(torch.isfinite(x).all())


def class_targets(targets, n: int, device=None, *, grid: bool = True) -> Tensor:
    """Class targets of N images as int64 on ``device``.

    targets: an int (every image), N ints (list or (N,) tensor), or with ``grid`` N lists of K ints / an
    (N, K) tensor. Returns (N,) or (N, K). Floats, bools and other shapes are a ValueError (ranges are
    checked against the logits, :func:`check_class_range`).
    """
    if isinstance(targets, Tensor):
        t = targets.detach().to(device=device)
    elif isinstance(targets, int):
        t = torch.full((n,), targets, dtype=torch.long, device=device)
    else:
        try:
            t = torch.as_tensor(targets, device=device)
        except (TypeError, ValueError) as err:
            raise ValueError(f"targets must be ints, one per image, or N lists of K ints: {err}") from None
    if t.dim() == 0:
        t = t.expand(n)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"class targets must be integers, got {t.dtype}")
    if t.dim() > (2 if grid else 1) or t.shape[0] != n:
        shapes = "(N,) or (N, K)" if grid else "(N,)"
        raise ValueError(f"targets must have shape {shapes} with N = {n} images, got {tuple(t.shape)}")
    return t.long()


def captum_targets(target, n: int, device=None) -> Tensor:
    """Captum's classification targets -> (N,) int64: an int, a (1,) or (N,) tensor, or a list of N ints or
    1-tuples of ints. None and multi-dimensional output targets are a ValueError."""
    if target is None:
        raise ValueError("target is required: the class index of each input's logit")
    if isinstance(target, Tensor):
        t = target.reshape(-1) if target.numel() in (1, n) else target
    elif isinstance(target, int) and not isinstance(target, bool):
        t = torch.tensor([target])
    elif isinstance(target, Sequence) and not isinstance(target, str):
        items = [x[0] if isinstance(x, tuple) and len(x) == 1 else x for x in target]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            raise ValueError(
                "target must be class indices (an int, N ints, or a (N,) tensor); "
                "multi-dimensional output targets are not supported"
            )
        t = torch.tensor(items)
    else:
        raise ValueError(  # noqa: TRY004
            f"target must be an int, a list of ints or a tensor, got {type(target).__name__}"
        )
    if t.dim() != 1 or t.numel() not in (1, n):
        raise ValueError(f"target must hold 1 or {n} class indices, got shape {tuple(t.shape)}")
    return t.expand(n).to(device=device, dtype=torch.long)


def check_class_range(targets: Tensor, num_classes: int) -> None:
    """Raise ValueError unless every class index in ``targets`` (any shape) is in [0, num_classes)."""
    if not targets.numel():
        return
    low, high = torch.aminmax(targets)
    if low < 0 or high >= num_classes:
        bad = targets[(targets < 0) | (targets >= num_classes)]
        raise ValueError(f"target class {int(bad[0])} is out of range for a model with {num_classes} outputs")


def warn_if_training(model: nn.Module, *, stacklevel: int = 3) -> None:
    """Warn if a BatchNorm or Dropout module of ``model`` is in training mode: BatchNorm then normalises with
    the batch's statistics, so each image's result depends on the others in its batch (its running statistics
    are restored afterwards by the caller); dropout is random. stacklevel 3 points the warning at the caller
    of the function that calls this."""
    if any(m.training for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))):
        warnings.warn(
            "the model is in training mode: BatchNorm normalises with each batch's statistics, so each image's "
            "result depends on the others in its batch, and dropout is random (the model's running statistics "
            "and flags are left unchanged); call model.eval() for per-image results",
            stacklevel=stacklevel,
        )
