"""The explorer's "Method" panel: one of the core's pullback variants (:mod:`excitation_pullbacks.variants`)
with its few settings, computed with the gate panel's gate - exactly ``make_variant(name, schedule=gate,
...)(model, x, target)``.

The variants take class targets; a hidden neuron takes the pullback itself (``soft_pullback``, also times the
input). A Stop (or a client that went away) ends a long variant at its next forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from excitation_pullbacks import VARIANTS, GateOptions, Neuron, make_variant

__all__ = ["METHODS", "MethodSettings", "method_explain", "method_map", "method_title", "read_settings"]

#: The variants the page offers, in the order of its dropdown.
METHODS = tuple(VARIANTS)


@dataclass(frozen=True)
class MethodSettings:
    """A variant and its settings as the page holds them.

    name: a key of :data:`METHODS`; times_input: x * map (the input-times, "hadamard" map).
    steps, step_size, clip: ``pullback_ascent``'s K, alpha and clip (eps: no projection).
    samples, noise: ``smooth_pullback``'s samples and noise; ``fusion_pullback``'s input samples (per weight
    sample) and input noise. weight_samples, weight_noise: ``fusion_pullback``'s (multiplicative noise).
    seed: the noise generator's seed (the maps are reproducible).
    """

    name: str = "soft_pullback"
    times_input: bool = False
    steps: int = 5
    step_size: float = 20.0
    clip: bool = True
    samples: int = 10
    noise: float = 0.15
    weight_samples: int = 10
    weight_noise: float = 0.1
    seed: int = 0

    def options(self) -> dict:
        """The keyword options of ``make_variant`` (without the gate) for this variant."""
        if self.name == "pullback_ascent":
            return {"steps": self.steps, "step_size": self.step_size, "clip": self.clip}
        if self.name == "smooth_pullback":
            return {"samples": self.samples, "noise": self.noise, "seed": self.seed}
        if self.name == "fusion_pullback":
            return {
                "weight_samples": self.weight_samples,
                "input_samples": self.samples,
                "weight_noise": self.weight_noise,
                "noise": self.noise,
                "seed": self.seed,
            }
        return {}


def _count(name: str, value) -> int:
    number = float(value) if value is not None else math.nan
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _number(name: str, value) -> float:
    number = float(value) if value is not None else math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def read_settings(name, times_input, steps, step_size, clip, samples, noise, weight_samples, weight_noise, seed):
    """The method widgets' values -> :class:`MethodSettings`; ValueError (one line) for a bad value."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return MethodSettings(
        str(name),
        bool(times_input),
        _count("method steps K", steps),
        _number("method step size alpha", step_size),
        bool(clip),
        _count("samples", samples),
        _number("noise", noise),
        _count("weight samples", weight_samples),
        _number("weight noise", weight_noise),
        _count("seed", seed),
    )


def method_explain(settings: MethodSettings, gate: GateOptions):
    """The explain function ``(model, x (N, C, H, W), target) -> maps (N, C, H, W)`` of ``settings`` with the
    gate panel's ``gate``. ValueError (one line) for a setting the variant refuses."""
    try:
        return make_variant(settings.name, times_input=settings.times_input, schedule=gate, **settings.options())
    except (TypeError, ValueError) as err:
        raise ValueError(f"{settings.name}: {' '.join(str(err).split())}") from None


def method_title(settings: MethodSettings) -> str:
    """The panel's label: the variant and its settings."""
    opts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.options().items())
    name = f"{settings.name}({opts})"
    return f"x * {name}" if settings.times_input else name


def method_map(
    model: nn.Module,
    x: Tensor,
    target: int | Neuron,
    settings: MethodSettings,
    gate: GateOptions,
    should_stop: Callable[[], None] | None = None,
) -> Tensor:
    """The variant's map (1, 3, H, W) for x (1, 3, H, W) and a class index (the variants' (N,) int64 target) or,
    for ``soft_pullback``, a hidden neuron. ``should_stop()`` runs before every forward pass of the model (and of
    a variant's copies of it); it may raise to end the computation."""
    if isinstance(target, Neuron) and settings.name != "soft_pullback":
        raise ValueError(f"the method {settings.name} needs a class target; a hidden neuron takes soft_pullback")
    explain = method_explain(settings, gate)
    t = target if isinstance(target, Neuron) else torch.tensor([int(target)], device=x.device)
    handle = None
    if should_stop is not None:
        handle = model.register_forward_pre_hook(lambda _module, _args: should_stop())
    try:
        return explain(model, x, t)
    finally:
        if handle is not None:
            handle.remove()
