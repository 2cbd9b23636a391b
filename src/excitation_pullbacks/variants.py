"""Attribution methods built on the excitation pullback, as in "Pulling Back the Curtain on Deep Networks".

Each factory returns an *explain* function (:data:`~excitation_pullbacks.explain.Explain`):
``(model, x (N, C, H, W), target (N,) int64) -> maps (N, C, H, W)``. The model is left as it was (the core's
:func:`~excitation_pullbacks.pullback.pullback` and :func:`~excitation_pullbacks.ascent.ascent` restore it;
:func:`fusion_pullback` perturbs the weights of a deep copy only).

- :func:`soft_pullback`: the pullback itself (the paper's SoftPullback).
- :func:`pullback_ascent`: x_K - x_0 after K normalised ascent steps along pullbacks (PullbackAscent).
- :func:`smooth_pullback`: SmoothGrad over pullbacks (SmoothPullback).
- :func:`fusion_pullback`: FusionGrad over pullbacks, noise on the weights and the input (FusionPullback).
- :func:`input_times`: x * maps of any explain function (the "hadamard" maps).

:data:`VARIANTS` names the factories, :func:`make_variant` builds one by name with keyword options.
Gates: every factory takes ``schedule`` (a Schedule, GateOptions, a preset name or a temperature) and the
:class:`~excitation_pullbacks.options.GateOptions` keywords; the default is the preset ``"semantic"``, and
keywords alone change that preset (``soft_pullback(temperature=0.3)`` is ``preset("semantic",
temperature=0.3)``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .ascent import ascent
from .explain import Explain
from .options import GATE_OPTIONS, GateOptions, preset, resolve_schedule
from .pullback import pullback
from .schedules import Schedule

__all__ = [
    "DEFAULT_PRESET",
    "VARIANTS",
    "fusion_pullback",
    "input_times",
    "make_variant",
    "pullback_ascent",
    "smooth_pullback",
    "soft_pullback",
    "variant_schedule",
]

#: The gates of every variant unless a schedule is given: the deep-network method's defaults.
DEFAULT_PRESET = "semantic"

ScheduleLike = Schedule | GateOptions | str | float | Tensor | None


def variant_schedule(schedule: ScheduleLike = None, gate: Mapping[str, object] | None = None) -> Schedule:
    """The schedule of a variant: a preset name (``"semantic"``, ``"paper"``, ...) or None (the
    :data:`DEFAULT_PRESET`) with ``gate`` changes; otherwise as the core functions read ``schedule, **gate``."""
    gate = dict(gate or {})
    unknown = sorted(set(gate) - set(GATE_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected gate keyword(s) {', '.join(unknown)}; the schedule shorthands are {', '.join(GATE_OPTIONS)}"
        )
    if schedule is None or isinstance(schedule, str):
        return preset(DEFAULT_PRESET if schedule is None else schedule, **gate).schedule()
    return resolve_schedule(schedule, gate)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_std(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    if bounds is None:
        return None
    if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
        raise ValueError(f"bounds must be (low, high) with low <= high, or None; got {bounds}")
    return float(bounds[0]), float(bounds[1])


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _normal(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise drawn on the CPU in ``like``'s dtype (the same numbers on every device), moved
    to ``like``'s device."""
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def soft_pullback(schedule: ScheduleLike = None, *, batch_size: int | None = None, **gate) -> Explain:
    """The excitation pullback as an attribution: ``pullback(model, x, target, schedule)`` (N, C, H, W).

    schedule, **gate: the gates (:func:`variant_schedule`; default the ``semantic`` preset).
    batch_size: images per forward pass (None: all at once).
    """
    sched = variant_schedule(schedule, gate)

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return pullback(model, x, target, sched, batch_size=batch_size)

    return explain


def pullback_ascent(
    schedule: ScheduleLike = None,
    *,
    steps: int = 5,
    step_size: float = 20.0,
    eps: float | None = None,
    clip: bool = True,
    bounds: tuple[float, float] = (-1.0, 1.0),
    **gate,
) -> Explain:
    """The image change x_K - x_0 after ``steps`` ascent steps along pullbacks of the target logit.

    Each step: x <- x + step_size * g / ||g||_2 with g the pullback at x (per image); with ``eps``, x is
    then projected onto the L2 ball of radius eps around x_0 (None: no projection).
    clip: clamp x_K, after the last step only, to ``bounds`` (the author's PullbackAscentClipLast); False:
        no clamp at all (the author's PullbackAscent with clip_margin None). Neither clamps between steps.
    schedule, **gate: the gates (:func:`variant_schedule`; default the ``semantic`` preset).
    Returns (N, C, H, W) in input units; with clip, x_0 + maps stays inside ``bounds``.
    """
    _check_count("steps", steps, 0)
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 <= step_size < math.inf:
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
    if eps is not None:
        _check_std("eps", eps)
    low_high = _check_bounds(bounds) if clip else None
    sched = variant_schedule(schedule, gate)
    radius = math.inf if eps is None else float(eps)

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        x0 = x.detach()
        x_k = ascent(model, x0, target, sched, steps=steps, step_size=step_size, eps=radius, bounds=None)
        if low_high is not None:
            x_k = x_k.clamp(*low_high)
        return x_k - x0

    return explain


def smooth_pullback(
    schedule: ScheduleLike = None,
    *,
    samples: int = 50,
    noise: float = 0.15,
    bounds: tuple[float, float] | None = None,
    seed: int | None = None,
    draws_per_pass: int = 1,
    batch_size: int | None = None,
    **gate,
) -> Explain:
    """SmoothGrad over pullbacks: the mean over ``samples`` draws of ``pullback(model, x + noise * z, target)``.

    noise: the standard deviation in input units (0.15 on [-1, 1] images; not a fraction of the range).
    bounds: clamp each noisy image to (low, high); None: no clamp.
    seed: an int makes the maps reproducible: z for draw i is the i-th ``torch.randn(x.shape, dtype=x.dtype,
        generator=torch.Generator().manual_seed(seed))`` on the CPU, moved to x's device; None: torch's global
        generator (on the CPU).
    schedule, **gate: the gates (:func:`variant_schedule`; default the ``semantic`` preset).
    draws_per_pass, batch_size: noisy copies of the N images that go through one pullback call (as one
        batch of draws_per_pass * N images), and images per forward pass within that call (None: all). In
        eval mode they change only the speed (and float rounding); in train mode BatchNorm's batch statistics
        depend on them.
    """
    _check_count("samples", samples, 1)
    batching = (_check_count("draws_per_pass", draws_per_pass, 1), batch_size)
    noise = _check_std("noise", noise)
    low_high = _check_bounds(bounds)
    sched = variant_schedule(schedule, gate)

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        total = _noise_sum(model, x.detach(), target, sched, samples, noise, low_high, _generator(seed), batching)
        return total / samples

    return explain


def _noise_sum(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    schedule: Schedule,
    draws: int,
    std: float,
    bounds: tuple[float, float] | None,
    generator: torch.Generator | None,
    batching: tuple[int, int | None],
    total: Tensor | None = None,
) -> Tensor:
    """``total`` (None: zeros) plus, draw by draw, the pullbacks at ``draws`` noisy copies of x (drawn one
    after another); ``per_pass`` copies of the N images go through one pullback call."""
    per_pass, batch_size = batching
    target = torch.as_tensor(target, device=x.device)
    total = torch.zeros_like(x) if total is None else total
    for start in range(0, draws, per_pass):
        k = min(per_pass, draws - start)
        noisy = torch.cat([x + std * _normal(x.shape, x, generator) for _ in range(k)])
        if bounds is not None:
            noisy = noisy.clamp(*bounds)
        t = target.repeat(k) if target.dim() == 1 else target
        g = pullback(model, noisy, t, schedule, batch_size=batch_size)
        for part in g.unflatten(0, (k, x.shape[0])):
            total = total + part
    return total


def fusion_pullback(
    schedule: ScheduleLike = None,
    *,
    weight_samples: int = 10,
    input_samples: int = 10,
    weight_noise: float = 0.1,
    weight_noise_type: str = "multiplicative",
    noise: float = 0.15,
    bounds: tuple[float, float] | None = None,
    seed: int | None = None,
    draws_per_pass: int = 1,
    batch_size: int | None = None,
    **gate,
) -> Explain:
    """FusionGrad over pullbacks: the mean over ``weight_samples`` perturbed copies of the model and
    ``input_samples`` noisy inputs each of ``pullback(model_i, x + noise * z_ij, target)``.

    weight_noise, weight_noise_type: every parameter p of a deep copy of the model is set to
        p * (1 + weight_noise * u) (``multiplicative``) or p + weight_noise * u (``additive``), u standard
        normal per element, afresh from the user's weights for each weight sample; 0: the weights as they are.
        The user's model is never written to.
    noise, bounds: the input noise (standard deviation in input units) and an optional clamp, as in
        :func:`smooth_pullback`.
    seed: an int makes the maps reproducible (one CPU generator; for each weight sample, u for every
        parameter in ``model.parameters()`` order, then its ``input_samples`` input draws); None: torch's
        global generator.
    draws_per_pass, batch_size: as in :func:`smooth_pullback`.
    schedule, **gate: the gates (:func:`variant_schedule`; default the ``semantic`` preset).
    """
    _check_count("weight_samples", weight_samples, 1)
    batching = (_check_count("draws_per_pass", draws_per_pass, 1), batch_size)
    _check_count("input_samples", input_samples, 1)
    weight_noise = _check_std("weight_noise", weight_noise)
    noise = _check_std("noise", noise)
    if weight_noise_type not in ("multiplicative", "additive"):
        raise ValueError(f"weight_noise_type must be 'multiplicative' or 'additive', got {weight_noise_type!r}")
    low_high = _check_bounds(bounds)
    sched = variant_schedule(schedule, gate)

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
        x0 = x.detach()
        generator = _generator(seed)
        copied = copy.deepcopy(model) if weight_noise > 0 else model
        originals = [p.detach() for p in model.parameters()]
        targets = list(copied.parameters())
        total = None
        for _ in range(weight_samples):
            if weight_noise > 0:
                with torch.no_grad():
                    for p, original in zip(targets, originals):
                        u = weight_noise * _normal(original.shape, original, generator)
                        p.copy_(original * (1 + u) if weight_noise_type == "multiplicative" else original + u)
            total = _noise_sum(copied, x0, target, sched, input_samples, noise, low_high, generator, batching, total)
        return total / (weight_samples * input_samples)

    return explain


def input_times(explain: Explain) -> Explain:
    """The input-times-attribution map of ``explain``: ``x * explain(model, x, target)`` (N, C, H, W)."""

    def times_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return x.detach() * explain(model, x, target)

    return times_input


#: The variants by name; each value builds an explain function from keyword options.
VARIANTS: dict[str, Callable[..., Explain]] = {
    "soft_pullback": soft_pullback,
    "pullback_ascent": pullback_ascent,
    "smooth_pullback": smooth_pullback,
    "fusion_pullback": fusion_pullback,
}


def make_variant(name: str, *, times_input: bool = False, **options) -> Explain:
    """The explain function of variant ``name`` (a key of :data:`VARIANTS`) with ``options``;
    ``times_input``: wrapped in :func:`input_times`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown pullback variant {name!r}; choose one of {', '.join(VARIANTS)}")
    explain = VARIANTS[name](**options)
    return input_times(explain) if times_input else explain
