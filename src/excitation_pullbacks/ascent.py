"""Projected gradient ascent toward class logits or hidden neurons along excitation pullbacks (paper Sec. 6.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .checks import check_class_range, check_images, class_targets, warn_if_training
from .options import as_schedule, resolve_schedule
from .pullback import Neuron, Targets, engine_for, gated_forward
from .schedules import Schedule
from .state import preserved_model
from .stopping import ShouldStop, check_stop
from .subnormals import no_subnormals

__all__ = ["ascent"]


def ascent(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    schedule: Schedule | float | None = None,
    *,
    steps: int = 10,
    step_size: float = 20.0,
    eps: float = 100.0,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
    vanilla: bool = False,
    direction: Callable[[Tensor, Tensor], Tensor] | None = None,
    return_trajectory: bool = False,
    should_stop: ShouldStop = None,
    **gate,
) -> Tensor | tuple[Tensor, Tensor]:
    """Projected gradient ascent toward target logits (or a hidden neuron) along excitation pullbacks.

    Per sample: g = pullback of the target logit (or of the neuron's value); x <- x + step_size * g / ||g||_2; project x onto the L2
    ball of radius ``eps`` around the start; clamp to ``bounds``.

    images: (N, C, H, W), inside ``bounds``. targets: N ints, an int, or (N, K) / N lists of K ints for a grid;
        or a :class:`~excitation_pullbacks.pullback.Neuron` (a channel of a layer's output, at one position
        or summed over all), the same for every image (not with ``direction``).
    schedule, **gate: the gates (:func:`~excitation_pullbacks.gates.as_schedule`).
    bounds: (low, high) the image range to clamp to after each step ((-1, 1): images behind ImageNetInput);
        None: no clamp.
    vanilla: use the vanilla gradient (the paper's control) instead of the excitation pullback; the gate
        arguments are ignored.
    direction: any other step direction, ``direction(x, t) -> (M, C, H, W)`` for x (M, C, H, W) and class
        targets t (M,) (e.g. a Captum attribution from ``excitation_pullbacks.baselines``); it replaces the
        pullback, and the gate arguments are ignored.
    should_stop: called before each step; True ends the call with :class:`~excitation_pullbacks.stopping.Stopped`.
    The model is left as it was (:func:`~excitation_pullbacks.state.preserved_model`; in train mode BatchNorm
    uses each batch's statistics, its running statistics are restored).
    Returns the final images, (N, C, H, W) or (N, K, C, H, W) for a grid; with ``return_trajectory`` also
    every step, (steps + 1, ...) starting with the original images.
    """
    if steps < 0 or not step_size >= 0 or not eps >= 0:
        raise ValueError(f"ascent needs steps >= 0, step_size >= 0, eps >= 0 (got {steps}, {step_size}, {eps})")
    if bounds is not None:
        if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
            raise ValueError(f"bounds must be (low, high) with low <= high, or None; got {bounds}")
        low, high = float(bounds[0]), float(bounds[1])
    check_images(model, images)
    neuron = targets if isinstance(targets, Neuron) else None
    if neuron is not None and direction is not None:
        raise ValueError("a direction takes class targets, not a Neuron")
    warn_if_training(model)
    n = images.shape[0]
    t = (
        torch.zeros(n, dtype=torch.long, device=images.device)
        if neuron is not None
        else class_targets(targets, n, images.device)
    )
    grid_shape = None
    x0 = images.detach()
    if t.dim() == 2:  # every (image, class) pair is its own sample
        grid_shape = t.shape
        x0 = x0[:, None].expand(-1, t.shape[1], *x0.shape[1:]).reshape(-1, *x0.shape[1:])
        t = t.reshape(-1)
    if vanilla and direction is not None:
        raise ValueError("ascent takes either vanilla=True or a direction, not both")
    sched = resolve_schedule(schedule, gate)  # validated also when vanilla ignores it
    if vanilla:
        sched = as_schedule(temperature=0.0, gate="hard")
    engine = engine_for(model, sched)
    x = x0.clone()
    trajectory = [x0.clone()] if return_trajectory else None
    dims = tuple(range(1, x.dim()))
    with preserved_model(model, freeze=True), torch.enable_grad():
        for _ in range(steps):
            check_stop(should_stop)
            if neuron is not None:
                xr = x.detach().requires_grad_(True)
                out = gated_forward(engine, xr, neuron)
                with no_subnormals(xr.dtype, xr.device):
                    (g,) = torch.autograd.grad(out.sum(), xr)
            elif direction is None:
                xr = x.detach().requires_grad_(True)
                logits = gated_forward(engine, xr)
                check_class_range(t, logits.shape[1])
                with no_subnormals(xr.dtype, xr.device):
                    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xr)
            else:
                g = direction(x.detach(), t).detach()
                if g.shape != x.shape:
                    raise ValueError(f"direction returned shape {tuple(g.shape)}, expected {tuple(x.shape)}")
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *(1,) * len(dims))
            x = x + step_size * g / norm
            delta = x - x0
            dnorm = delta.flatten(1).norm(dim=1).view(-1, *(1,) * len(dims))
            x = x0 + delta * (eps / dnorm.clamp_min(1e-12)).clamp(max=1.0)
            x = (x if bounds is None else x.clamp(low, high)).detach()
            if trajectory is not None:
                trajectory.append(x.clone())

    def shaped(a: Tensor) -> Tensor:
        return a if grid_shape is None else a.reshape(*grid_shape, *a.shape[1:])

    if trajectory is None:
        return shaped(x)
    return shaped(x), torch.stack([shaped(a) for a in trajectory])
