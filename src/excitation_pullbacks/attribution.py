"""Captum-style interface: ``ExcitationPullback(model).attribute(inputs, target=...)``.

A Captum ``GradientAttribution``, so it composes with Captum's wrappers (e.g. ``NoiseTunnel`` for SmoothGrad
over excitation pullbacks) and plugs into code written for Captum; :func:`quantus_explain` is the
``explain_func`` Quantus metrics call. Importing this module needs Captum (a dependency of the package).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from .gates import Schedule, Temperature
from .pullback import pullback

__all__ = ["ExcitationPullback", "quantus_explain"]


class ExcitationPullback(GradientAttribution):
    """Excitation pullbacks as a Captum attribution method.

    forward_func: the model (an ``nn.Module`` returning logits (N, classes)); the gate arguments are those of
        :func:`excitation_pullbacks.pullback` (temperature=0 gives Captum's ``Saliency(abs=False)``).
    """

    def __init__(
        self,
        forward_func: nn.Module,
        *,
        temperature: Temperature = 0.3,
        gate: str = "sigmoid",
        pool_temperature: Temperature | None = None,
        pool_detach: bool = False,
        schedule: Schedule | None = None,
    ) -> None:
        if not isinstance(forward_func, nn.Module):
            raise ValueError("ExcitationPullback needs the model itself (an nn.Module), not a function: its "
                             "ReLU and max-pool calls are found while the module runs")
        super().__init__(forward_func)
        self.options = dict(temperature=temperature, gate=gate, pool_temperature=pool_temperature,
                            pool_detach=pool_detach, schedule=schedule)

    @log_usage()  # Captum's wrappers (NoiseTunnel) call attribute.__wrapped__
    def attribute(self, inputs, target=None, additional_forward_args=None):
        """inputs: (N, C, H, W) or a 1-tuple of it; target: an int, N ints (list or (N,) tensor), or a list of
        1-tuples/ints as Captum accepts for classification. Returns the pullbacks in the form of ``inputs``."""
        if additional_forward_args is not None:
            raise ValueError("ExcitationPullback does not take additional_forward_args: the model must take the "
                             "image alone")
        is_tuple = isinstance(inputs, tuple)
        if is_tuple and len(inputs) != 1:
            raise ValueError(f"ExcitationPullback takes one input tensor, got a tuple of {len(inputs)}")
        x = inputs[0] if is_tuple else inputs
        maps = pullback(self.forward_func, x, _class_targets(target, x.shape[0], x.device), **self.options)
        return (maps,) if is_tuple else maps

    @property
    def multiplies_by_inputs(self) -> bool:
        return False


def _class_targets(target, n: int, device) -> Tensor:
    """Captum's classification targets -> (N,) int64."""
    if target is None:
        raise ValueError("target is required: the class index of each input's logit")
    if isinstance(target, Tensor):
        t = target.reshape(-1) if target.numel() in (1, n) else target
    elif isinstance(target, int) and not isinstance(target, bool):
        t = torch.tensor([target])
    elif isinstance(target, Sequence) and not isinstance(target, str):
        items = [x[0] if isinstance(x, tuple) and len(x) == 1 else x for x in target]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            raise ValueError("target must be class indices (an int, N ints, or a (N,) tensor); "
                             "multi-dimensional output targets are not supported")
        t = torch.tensor(items)
    else:
        raise ValueError(f"target must be an int, a list of ints or a tensor, got {type(target).__name__}")
    if t.dim() != 1 or t.numel() not in (1, n):
        raise ValueError(f"target must hold 1 or {n} class indices, got shape {tuple(t.shape)}")
    return t.expand(n).to(device=device, dtype=torch.long)


def quantus_explain(model: nn.Module, inputs, targets, **kwargs) -> np.ndarray:
    """``explain_func`` for Quantus metrics: inputs (N, C, H, W) array or tensor, targets (N,) -> (N, C, H, W)
    float32 array of excitation pullbacks. Keyword arguments: ``device`` and those of ExcitationPullback."""
    device = kwargs.pop("device", None)
    options = {k: kwargs[k] for k in ("temperature", "gate", "pool_temperature", "pool_detach", "schedule")
               if k in kwargs}
    dtype = next(model.parameters()).dtype
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs).to(
        device=device or next(model.parameters()).device, dtype=dtype)
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets).reshape(-1).long()
    maps = ExcitationPullback(model, **options).attribute(x, target=t.to(x.device))
    return maps.detach().cpu().float().numpy()
