"""One warning line when every map of a batch is exactly 0: the model's output does not depend on its input."""

from __future__ import annotations

import logging

from torch import Tensor, nn

from excitation_pullbacks.models import zero_heads

__all__ = ["warn_if_zero", "zero_message"]


def _model_label(model: nn.Module) -> str:
    """The classifier's class name (inside the [-1, 1] input wrapper, if any)."""
    return type(getattr(model, "backbone", model)).__name__


def zero_message(maps: Tensor, model: nn.Module, what: str = "pullback") -> str | None:
    """None unless every entry of ``maps`` (any shape, at least one entry) is 0; then one line saying why,
    naming ``model``'s all-zero ``nn.Linear`` layers when it has any."""
    if maps.numel() == 0 or maps.any():
        return None
    heads = zero_heads(model)
    if heads:
        why = (
            f"its layer {heads[0]} has all-zero weights: a zero-initialised head, as torchvision's ViTs start "
            "with; load trained weights, or give it random ones (excitation_pullbacks.models.randomize_zero_heads)"
        )
    else:
        why = "a zero-initialised head? a constant or saturated output?"
    return (
        f"every {what} of this batch is 0 ({_model_label(model)}): the model's output does not depend on the "
        f"input ({why})"
    )


def warn_if_zero(maps: Tensor, model: nn.Module, log: logging.Logger, what: str = "pullback") -> bool:
    """Log :func:`zero_message` as a warning when it has one; returns whether it did."""
    message = zero_message(maps, model, what)
    if message is not None:
        log.warning(message)
    return message is not None
