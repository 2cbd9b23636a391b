"""Zero-initialised classifier heads: find them, and give them random weights.

torchvision starts the head of its vision transformers at zero (``VisionTransformer.heads.head``, weight and
bias), a choice for fine-tuning: with random weights every logit is then a constant, and every gradient and
every pullback of the input is exactly 0. :func:`randomize_zero_heads` draws such a layer afresh so that a
randomly initialised model depends on its input; :func:`build_model` applies it when asked for random weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HEAD_STD", "randomize_zero_heads", "zero_heads"]

#: The standard deviation of the weights :func:`randomize_zero_heads` draws (timm's ViT head init).
HEAD_STD = 0.02


def zero_heads(model: nn.Module) -> list[str]:
    """The names of ``model``'s ``nn.Linear`` layers whose weight is all zero (on ``model.named_modules()``)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not m.weight.any()]


def randomize_zero_heads(
    model: nn.Module, generator: torch.Generator | None = None, *, std: float = HEAD_STD
) -> list[str]:
    """Give every all-zero ``nn.Linear`` weight of ``model`` (in place) N(0, std^2) entries; the bias is kept.

    generator: a CPU generator for the draws (None: torch's global random state), each drawn in the layer's
    dtype on the CPU and moved to its device, so a seed gives the same weights on every device.
    Returns the names of the layers changed (empty: the model had none).
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    names = zero_heads(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            w = modules[name].weight
            w.copy_(torch.randn(w.shape, generator=generator, dtype=w.dtype).mul_(std).to(w.device))
    return names
