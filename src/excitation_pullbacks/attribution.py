"""Captum-style interface: ``ExcitationPullback(model).attribute(inputs, target=...)``.

A Captum ``GradientAttribution``, so it composes with Captum's wrappers (e.g. ``NoiseTunnel`` for SmoothGrad
over excitation pullbacks) and plugs into code written for Captum; :func:`quantus_explain` is the
``explain_func`` Quantus metrics call. Importing this module needs Captum (a dependency of the package).
"""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .checks import captum_targets
from .options import GATE_OPTIONS, resolve_schedule
from .pullback import pullback
from .schedules import Schedule

__all__ = ["ExcitationPullback", "quantus_explain"]


class ExcitationPullback(GradientAttribution):
    """Excitation pullbacks as a Captum attribution method.

    forward_func: the model (an ``nn.Module`` returning logits (N, classes)).
    schedule, **gate: the gates (:func:`~excitation_pullbacks.gates.as_schedule`; temperature=0 gives
        Captum's ``Saliency(abs=False)``).
    """

    def __init__(self, forward_func: nn.Module, schedule: Schedule | float | None = None, **gate) -> None:
        if not isinstance(forward_func, nn.Module):
            raise ValueError(  # noqa: TRY004
                "ExcitationPullback needs the model itself (an nn.Module), not a function: its ReLU and max-pool "
                "calls are found while the module runs"
            )
        super().__init__(forward_func)
        self.schedule = resolve_schedule(schedule, gate)

    @log_usage()  # Captum's wrappers (NoiseTunnel) call attribute.__wrapped__
    def attribute(self, inputs, target=None, additional_forward_args=None):
        """inputs: (N, C, H, W) or a 1-tuple of it; target: an int, N ints (list or (N,) tensor), or a list of
        1-tuples/ints as Captum accepts for classification. Returns the pullbacks in the form of ``inputs``."""
        if additional_forward_args is not None:
            raise ValueError(
                "ExcitationPullback does not take additional_forward_args: the model must take the image alone"
            )
        is_tuple = isinstance(inputs, tuple)
        if is_tuple and len(inputs) != 1:
            raise ValueError(f"ExcitationPullback takes one input tensor, got a tuple of {len(inputs)}")
        x = inputs[0] if is_tuple else inputs
        maps = pullback(self.forward_func, x, captum_targets(target, x.shape[0], x.device), self.schedule)
        return (maps,) if is_tuple else maps

    @property
    def multiplies_by_inputs(self) -> bool:
        return False


def quantus_explain(model: nn.Module, inputs, targets, **kwargs) -> np.ndarray:
    """``explain_func`` for Quantus metrics: inputs (N, C, H, W) array or tensor, targets (N,) -> (N, C, H, W)
    float32 array of excitation pullbacks. Keyword arguments: ``device``, ``schedule`` and the gate keywords
    of ExcitationPullback; others (Quantus passes its own) are ignored."""
    device = kwargs.pop("device", None)
    options = {k: kwargs[k] for k in GATE_OPTIONS + ("schedule",) if k in kwargs}
    dtype = next(model.parameters()).dtype
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs).to(
        device=device or next(model.parameters()).device, dtype=dtype
    )
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets).reshape(-1).long()
    maps = ExcitationPullback(model, **options).attribute(x, target=t.to(x.device))
    return maps.detach().cpu().float().numpy()
