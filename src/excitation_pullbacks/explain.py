"""The explain-function interface shared by attribution methods, metrics and the ascent loop.

An *explain* function maps ``(model, x, target) -> maps``: x (N, C, H, W) images, target (N,) int64 class
indices, maps (N, C, H, W) signed attributions in input space. :func:`excitation_pullbacks.baselines.explainer`
makes them; :mod:`excitation_pullbacks.metrics` scores them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["Explain"]

Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]
