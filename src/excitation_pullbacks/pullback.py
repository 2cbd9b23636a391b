"""Excitation pullbacks of class logits or hidden neurons, and projected gradient ascent along them.

All functions take the model as the user has it (any ``nn.Module`` mapping images to logits; wrap
torchvision backbones in :class:`~excitation_pullbacks.models.ImageNetInput` for images in [-1, 1]) and
leave it as it was: parameters are frozen only for the duration of the call (so the backward computes no
weight gradients) and their ``requires_grad`` flags are restored, also after an exception.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
from torch import Tensor

from .gates import ByType, Schedule, Temperature, make_schedule
from .patching import Excitation, Report

__all__ = ["Neuron", "pullback", "ascent", "frozen_parameters", "check_images"]


@dataclass(frozen=True)
class Neuron:
    """A hidden-neuron target: channel ``channel`` of the output of module ``layer``.

    position: (h, w) for one spatial position; None sums the channel over all positions.
    call: which call of a module used several times (-1: the last).
    """

    layer: str
    channel: int
    position: tuple[int, int] | None = None
    call: int = -1


Targets = Union[int, Sequence[int], Sequence[Sequence[int]], Tensor, Neuron]


@contextmanager
def frozen_parameters(model: nn.Module):
    """Set requires_grad=False on every parameter for the block; restore each flag afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _first(model: nn.Module, types) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, types)), None)


def check_images(model: nn.Module, images: Tensor) -> None:
    """Raise ValueError unless ``images`` fits the model's first layer: (N, C, H, W) for a conv net."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a tensor, got {type(images).__name__}")
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
    elif isinstance(first, nn.Linear):
        if images.dim() < 2 or images.shape[-1] != first.in_features:
            raise ValueError(
                f"inputs must have shape (N, {first.in_features}) for this model, got {tuple(images.shape)}"
            )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")


def _class_targets(targets, n: int, device) -> Tensor:
    """targets -> LongTensor (N,) for one class per image or (N, K) for K classes per image."""
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
    if t.dim() > 2 or t.shape[0] != n:
        raise ValueError(f"targets must have shape (N,) or (N, K) with N = {n} images, got {tuple(t.shape)}")
    return t.long()


def _check_range(t: Tensor, num_classes: int) -> None:
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise ValueError(f"target class {int(bad[0])} is out of range for a model with {num_classes} outputs")


def _resolve_module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        close = difflib.get_close_matches(layer, list(modules), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown layer name {layer!r}{hint}")
    return modules[layer]


def _neuron_value(out, neuron: Neuron) -> Tensor:
    if not isinstance(out, Tensor):
        raise ValueError(f"layer {neuron.layer!r} does not output a single tensor")
    if out.dim() < 2 or not 0 <= neuron.channel < out.shape[1]:
        raise ValueError(f"channel {neuron.channel} is out of range for layer {neuron.layer!r} output {tuple(out.shape)}")
    a = out[:, neuron.channel]
    if neuron.position is None:
        return a.reshape(a.shape[0], -1).sum(1)
    h, w = neuron.position
    if a.dim() != 3 or not (0 <= h < a.shape[1] and 0 <= w < a.shape[2]):
        raise ValueError(f"position {neuron.position} is out of range for layer {neuron.layer!r} output {tuple(out.shape)}")
    return a[:, h, w]


def engine_for(model: nn.Module, schedule: Schedule) -> Excitation:
    """The engine used with frozen parameters: lean BatchNorm backward unless every gate is hard (then the
    native ops run untouched and the result is the vanilla gradient bit for bit)."""
    all_hard = isinstance(schedule, ByType) and schedule.is_hard
    return Excitation(model, schedule, lean_batchnorm=not all_hard)


def _warn_if_training(model: nn.Module) -> None:
    if any(m.training for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))):
        warnings.warn("the model is in training mode (BatchNorm uses and updates batch statistics, dropout is "
                      "random); call model.eval() first", stacklevel=3)


def _check_gated(report: Report) -> None:
    if report.total == 0:
        raise ValueError("the model made no ReLU, SiLU, GELU or max-pool call: there is nothing to gate")


def _forward(engine: Excitation, x: Tensor, neuron: Neuron | None):
    """Run the model under the engine; returns logits (N, classes) or the neuron's values (N,)."""
    if neuron is None:
        with engine as report:
            out = engine.model(x)
        _check_gated(report)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError(f"the model must return logits of shape (N, classes), got {getattr(out, 'shape', type(out))}")
        return out
    module = _resolve_module(engine.model, neuron.layer)
    outs: list = []
    # clone: the forward may modify the layer's output in place later (e.g. an in-place ReLU)
    handle = module.register_forward_hook(lambda m, a, o: outs.append(o.clone() if isinstance(o, Tensor) else o))
    try:
        with engine as report:
            engine.model(x)
    finally:
        handle.remove()
    _check_gated(report)
    if not outs:
        raise ValueError(f"layer {neuron.layer!r} was not called in the forward pass")
    if not -len(outs) <= neuron.call < len(outs):
        raise ValueError(f"layer {neuron.layer!r} was called {len(outs)} times; call {neuron.call} does not exist")
    return _neuron_value(outs[neuron.call], neuron)


def pullback(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    *,
    temperature: Temperature = 0.3,
    gate: str = "sigmoid",
    pool_temperature: Temperature | None = None,
    pool_detach: bool = False,
    schedule: Schedule | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Excitation pullbacks of ``targets`` at ``images``.

    images: (N, C, H, W) (any range the model takes; [-1, 1] with ImageNetInput).
    targets: an int (same class for every image) or N ints -> returns (N, C, H, W);
        N lists of K ints, or an (N, K) tensor -> returns (N, K, C, H, W), one forward per image batch and
        K backward passes sharing it; or a :class:`Neuron` -> (N, C, H, W).
    temperature, gate, pool_temperature, pool_detach, schedule: see ``excitation``; temperature=0 gives
        the exact vanilla input gradient. SiLU and GELU sites follow ``temperature`` with their own gate
        shape (sigmoid(z/T), Phi(z/T)); set them apart with ``schedule=make_schedule(smooth_temperature=...)``.
    batch_size: images per forward pass (None: all at once), to bound memory.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sched = make_schedule(
        temperature=temperature, gate=gate, pool_temperature=pool_temperature, pool_detach=pool_detach,
        schedule=schedule,
    )
    check_images(model, images)
    n = images.shape[0]
    neuron = targets if isinstance(targets, Neuron) else None
    if neuron is not None:
        _resolve_module(model, neuron.layer)
        t = None
    else:
        t = _class_targets(targets, n, images.device)  # range checked against the logits
    _warn_if_training(model)
    engine = engine_for(model, sched)
    step = batch_size or n
    chunks = []
    with frozen_parameters(model), torch.enable_grad():
        for start in range(0, n, step):
            x = images[start : start + step].detach().requires_grad_(True)
            chunks.append(_pullback_chunk(engine, x, None if t is None else t[start : start + step], neuron))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def _pullback_chunk(engine: Excitation, x: Tensor, t: Tensor | None, neuron: Neuron | None) -> Tensor:
    out = _forward(engine, x, neuron)
    if neuron is not None:
        (g,) = torch.autograd.grad(out.sum(), x)
        return g
    _check_range(t, out.shape[1])
    if t.dim() == 1:
        (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x)
        return g
    k = t.shape[1]
    grads = []
    for j in range(k):  # the gates depend only on the forward pass: K backward passes share it
        (g,) = torch.autograd.grad(out.gather(1, t[:, j : j + 1]).sum(), x, retain_graph=j < k - 1)
        grads.append(g)
    return torch.stack(grads, 1)


def ascent(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    *,
    steps: int = 10,
    step_size: float = 20.0,
    eps: float = 100.0,
    temperature: Temperature = 0.3,
    gate: str = "sigmoid",
    pool_temperature: Temperature | None = None,
    pool_detach: bool = False,
    schedule: Schedule | None = None,
    vanilla: bool = False,
    direction: Callable[[Tensor, Tensor], Tensor] | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Projected gradient ascent toward target logits along excitation pullbacks (paper Sec. 6.1).

    Per sample: g = pullback of the target logit; x <- x + step_size * g / ||g||_2; project x onto the L2
    ball of radius ``eps`` around the start; clamp to [-1, 1].

    images: (N, C, H, W) in [-1, 1]. targets: N ints, an int, or (N, K) / N lists of K ints for a grid.
    vanilla: use the vanilla gradient (the paper's control) instead of the excitation pullback.
    direction: any other step direction, ``direction(x, t) -> (M, C, H, W)`` for x (M, C, H, W) and class
        targets t (M,) (e.g. a Captum attribution from ``excitation_pullbacks.baselines``); it replaces the
        pullback, and the gate arguments are ignored.
    Returns the final images, (N, C, H, W) or (N, K, C, H, W) for a grid; with ``return_trajectory`` also
    every step, (steps + 1, ...) starting with the original images.
    """
    if steps < 0 or not step_size >= 0 or not eps >= 0:
        raise ValueError(f"ascent needs steps >= 0, step_size >= 0, eps >= 0 (got {steps}, {step_size}, {eps})")
    check_images(model, images)
    if isinstance(targets, Neuron):
        raise ValueError("ascent targets must be classes")
    _warn_if_training(model)
    n = images.shape[0]
    t = _class_targets(targets, n, images.device)
    grid_shape = None
    x0 = images.detach()
    if t.dim() == 2:  # every (image, class) pair is its own sample
        grid_shape = t.shape
        x0 = x0[:, None].expand(-1, t.shape[1], *x0.shape[1:]).reshape(-1, *x0.shape[1:])
        t = t.reshape(-1)
    if vanilla and direction is not None:
        raise ValueError("ascent takes either vanilla=True or a direction, not both")
    if vanilla:
        temperature, gate, schedule = 0.0, "hard", None
    sched = make_schedule(
        temperature=temperature, gate=gate, pool_temperature=pool_temperature, pool_detach=pool_detach,
        schedule=schedule,
    )
    engine = engine_for(model, sched)
    x = x0.clone()
    trajectory = [x0.clone()] if return_trajectory else None
    dims = tuple(range(1, x.dim()))
    with frozen_parameters(model), torch.enable_grad():
        for _ in range(steps):
            if direction is None:
                xr = x.detach().requires_grad_(True)
                logits = _forward(engine, xr, None)
                _check_range(t, logits.shape[1])
                (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xr)
            else:
                g = direction(x.detach(), t).detach()
                if g.shape != x.shape:
                    raise ValueError(f"direction returned shape {tuple(g.shape)}, expected {tuple(x.shape)}")
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *(1,) * len(dims))
            x = x + step_size * g / norm
            delta = x - x0
            dnorm = delta.flatten(1).norm(dim=1).view(-1, *(1,) * len(dims))
            x = (x0 + delta * (eps / dnorm.clamp_min(1e-12)).clamp(max=1.0)).clamp(-1.0, 1.0).detach()
            if trajectory is not None:
                trajectory.append(x.clone())

    def shaped(a: Tensor) -> Tensor:
        return a if grid_shape is None else a.reshape(*grid_shape, *a.shape[1:])

    if trajectory is None:
        return shaped(x)
    return shaped(x), torch.stack([shaped(a) for a in trajectory])
