"""Hidden-neuron views for the figures task: pullbacks of chosen channels of one layer and ascent toward them,
vanilla vs excitation, and the grid that shows them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from excitation_pullbacks import Neuron, ascent, pullback

from .plots import labelled_grid, stack_panels
from .schedules import VANILLA, GateSetting

__all__ = ["fig_neurons", "neuron_views"]


def neuron_views(
    model: nn.Module,
    x: Tensor,
    neurons: Sequence[Neuron],
    setting: GateSetting,
    *,
    steps: int,
    step_size: float,
    eps: float,
) -> dict[str, Tensor]:
    """x (B, 3, H, W) -> {neuron_vanilla, neuron_excitation}: pullbacks (B, J, 3, H, W) of the J neurons,
    and with steps > 0 {neuron_van_ascent, neuron_exc_ascent}: the images after ``steps`` ascent steps toward
    each neuron (B, J, 3, H, W), vanilla gradient vs excitation pullback at ``setting``."""
    out = {
        "neuron_vanilla": torch.stack([pullback(model, x, n, VANILLA.schedule) for n in neurons], 1),
        "neuron_excitation": torch.stack([pullback(model, x, n, setting.schedule) for n in neurons], 1),
    }
    if steps > 0:
        budget = dict(steps=steps, step_size=step_size, eps=eps)
        out["neuron_van_ascent"] = torch.stack([ascent(model, x, n, vanilla=True, **budget) for n in neurons], 1)
        out["neuron_exc_ascent"] = torch.stack([ascent(model, x, n, setting.schedule, **budget) for n in neurons], 1)
    return out


def fig_neurons(
    images: Tensor, views: dict[str, Tensor], columns: Sequence[str], *, layer: str, temperature: str
) -> Image.Image:
    """Panels of images (R, 3, H, W) x neurons (``columns``): vanilla and excitation pullbacks, then the
    differences after ascent toward each neuron (when ``views`` holds them)."""
    titles = ["original", *columns]

    def panel(cells: Tensor) -> Image.Image:
        return labelled_grid(torch.cat([images[:, None], cells], 1), titles)

    panels = [panel(views["neuron_vanilla"]), panel(views["neuron_excitation"])]
    names = [f"{layer}: vanilla gradients of the neurons", f"{layer}: excitation pullbacks (T = {temperature})"]
    if "neuron_exc_ascent" in views:
        panels += [
            panel(views["neuron_van_ascent"] - images[:, None]),
            panel(views["neuron_exc_ascent"] - images[:, None]),
        ]
        names += [
            "differences after ascent along vanilla gradients",
            "differences after ascent along excitation pullbacks",
        ]
    return stack_panels(panels, names)
