"""Baseline attribution methods from Captum, behind one interface shared with excitation pullbacks.

Each method is an *explain* function (:data:`~excitation_pullbacks.explain.Explain`); the same functions
feed the figure grids, the ascent loop (``ascent(direction=as_direction(...))``) and the metrics in
:mod:`excitation_pullbacks.metrics`. Importing this module needs Captum (a dependency of the package).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
from torch import Tensor, nn

from .attribution import ExcitationPullback
from .explain import Explain
from .options import resolve_schedule
from .pullback import frozen_parameters
from .schedules import Schedule
from .state import preserved_model

__all__ = ["BASELINES", "METHODS", "Explain", "as_direction", "explainer"]

#: Baselines computed by Captum, and all methods (the baselines and excitation pullbacks).
BASELINES = ("vanilla", "smoothgrad", "guided_backprop", "integrated_gradients")
METHODS = BASELINES + ("excitation",)


def _vanilla(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return Saliency(model).attribute(x, target=target, abs=False)


def _smoothgrad(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    samples: int,
    noise: float,
    batch_size: int | None,
    value_range: float,
) -> Tensor:
    return NoiseTunnel(Saliency(model)).attribute(
        x,
        nt_type="smoothgrad",
        nt_samples=samples,
        nt_samples_batch_size=batch_size,
        stdevs=noise * value_range,
        target=target,
        abs=False,
    )


def _guided_backprop(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return GuidedBackprop(model).attribute(x, target=target)


def _integrated_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *, steps: int, baseline: float, batch_size: int | None
) -> Tensor:
    return IntegratedGradients(model).attribute(
        x, baselines=baseline, target=target, n_steps=steps, internal_batch_size=batch_size
    )


def _excitation(model: nn.Module, x: Tensor, target: Tensor, *, schedule: Schedule) -> Tensor:
    return ExcitationPullback(model, schedule).attribute(x, target=target)


def explainer(
    method: str,
    schedule: Schedule | float | None = None,
    *,
    smoothgrad_samples: int = 25,
    smoothgrad_noise: float = 0.15,
    ig_steps: int = 32,
    ig_baseline: float = -1.0,
    value_range: float = 2.0,
    batch_size: int | None = None,
    **gate,
) -> Explain:
    """The explain function of ``method`` (one of :data:`METHODS`).

    vanilla: Captum ``Saliency(abs=False)``, the input gradient.
    smoothgrad: ``NoiseTunnel(Saliency)``, mean gradient over ``smoothgrad_samples`` noisy copies with noise
        std ``smoothgrad_noise * value_range`` (Smilkov et al. suggest 10-20% of the input range; images in
        [-1, 1] have range 2).
    guided_backprop: Captum ``GuidedBackprop`` (only ``nn.ReLU`` modules are modified, as Captum does).
    integrated_gradients: Captum ``IntegratedGradients`` from the constant image ``ig_baseline`` (-1: black
        in [-1, 1] images) with ``ig_steps`` Gauss-Legendre points.
    excitation: :class:`~excitation_pullbacks.attribution.ExcitationPullback` with the gates ``schedule,
        **gate`` (:func:`~excitation_pullbacks.gates.as_schedule`; validated for every method, used only here).
    batch_size: forward-pass batch for SmoothGrad samples / IG steps (None: all at once).
    """
    sched = resolve_schedule(schedule, gate)
    if method == "vanilla":
        fn = _vanilla
    elif method == "smoothgrad":
        if smoothgrad_samples < 1 or not smoothgrad_noise >= 0:
            raise ValueError(
                f"smoothgrad needs samples >= 1 and noise >= 0, got {smoothgrad_samples}, {smoothgrad_noise}"
            )
        fn = partial(
            _smoothgrad,
            samples=smoothgrad_samples,
            noise=smoothgrad_noise,
            batch_size=batch_size,
            value_range=value_range,
        )
    elif method == "guided_backprop":
        fn = _guided_backprop
    elif method == "integrated_gradients":
        if ig_steps < 1:
            raise ValueError(f"integrated_gradients needs ig_steps >= 1, got {ig_steps}")
        fn = partial(_integrated_gradients, steps=ig_steps, baseline=ig_baseline, batch_size=batch_size)
    elif method == "excitation":
        fn = partial(_excitation, schedule=sched)
    else:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        # no weight gradients; buffers (BatchNorm statistics in train mode) and flags restored
        with preserved_model(model), frozen_parameters(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # Captum's notice
            return fn(model, x.detach().requires_grad_(True), target).detach()

    explain.__name__ = method
    return explain


def as_direction(model: nn.Module, explain: Explain) -> Callable[[Tensor, Tensor], Tensor]:
    """``explain`` as an ascent step direction: ``direction(x, t) -> (M, C, H, W)`` for ``ascent(direction=...)``."""
    return lambda x, t: explain(model, x, t)
