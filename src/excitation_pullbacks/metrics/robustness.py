"""Robustness: how much do the maps change under small input noise?"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import class_targets, warn_if_training
from ..explain import Explain
from ..state import keeps_model
from ..stopping import ShouldStop, check_stop

__all__ = ["max_sensitivity"]


@keeps_model
def max_sensitivity(
    model: nn.Module,
    x: Tensor,
    target,
    explain: Explain,
    maps: Tensor | None = None,
    *,
    samples: int = 200,
    radius: float = 0.2,
    noise: Tensor | None = None,
    nan_on_change: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    should_stop: ShouldStop = None,
) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019), as Quantus ``MaxSensitivity``. **Lower is better.**

    x: (N, C, H, W); target: (N,); explain(model, x, target) -> (N, C', H, W); maps: the maps of x (None:
    ``explain(model, x, target)``). For each of ``samples`` draws of noise U(-radius, radius) added to every
    feature (``noise``: (samples, N, C, H, W), the order Quantus draws it with numpy; else from
    ``generator``), the maps of the noisy images are recomputed; the score is the largest
    ||maps' - maps||_2 / ||maps||_2 over the draws (draws giving NaN ignored, as numpy's nanmax).
    nan_on_change: a draw that changes the predicted class counts as NaN (Quantus
    ``return_nan_when_prediction_changes``). batch_size: noisy images per explain call (None: N, one draw
    at a time as Quantus; a multiple of N puts several draws in one call).
    Returns (N,).
    """
    if samples < 1 or not radius >= 0:
        raise ValueError(f"max_sensitivity needs samples >= 1 and radius >= 0, got {samples}, {radius}")
    warn_if_training(model)
    x = x.detach()
    n = x.shape[0]
    t = class_targets(target, n, x.device, grid=False)
    a = (explain(model, x, t) if maps is None else maps).detach().to(x.dtype).flatten(1)
    if noise is None:
        u = torch.rand((samples, *x.shape), generator=generator, dtype=x.dtype, device="cpu" if generator else x.device)
        noise = radius * (2 * u - 1)
    noise = noise.to(device=x.device, dtype=x.dtype)
    if tuple(noise.shape) != (samples, *x.shape):
        raise ValueError(f"noise must have shape {(samples, *x.shape)}, got {tuple(noise.shape)}")
    per = max(1, (batch_size or n) // n)
    norm = a.norm(dim=1)
    label = None
    if nan_on_change:
        with torch.no_grad():
            label = model(x).argmax(1)
    rows = []
    for s0 in range(0, samples, per):
        check_stop(should_stop)
        s1 = min(samples, s0 + per)
        xs = (x[None] + noise[s0:s1]).reshape(-1, *x.shape[1:])
        ts = t.repeat(s1 - s0)
        moved = explain(model, xs, ts).detach().to(x.dtype).reshape(s1 - s0, n, -1)
        sens = (moved - a[None]).norm(dim=2) / norm[None]
        if label is not None:
            with torch.no_grad():
                changed = model(xs).argmax(1).view(s1 - s0, n) != label[None]
            sens = sens.masked_fill(changed, float("nan"))
        rows.append(sens)
    sens = torch.cat(rows)  # (samples, N)
    best = sens.nan_to_num(nan=-float("inf")).max(0).values
    return best.masked_fill(sens.isnan().all(0), float("nan"))
