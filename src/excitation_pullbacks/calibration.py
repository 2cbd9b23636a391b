"""Per-channel temperatures calibrated from pre-activation statistics.

The paper's global T works because BatchNorm puts most pre-activations on a similar scale; a per-neuron
sigma adapts to each channel's own spread: T_c = scale * std_c(z) at every gated ReLU, SiLU and GELU call
(channels: dim 1 of z, or its last dim where z comes straight from an nn.Linear, e.g. in ConvNeXt blocks).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .checks import check_images
from .gates import Gate
from .gating import Excitation
from .schedules import PER_CHANNEL_KINDS, ByType, PerChannel, Schedule
from .sites import Site

__all__ = ["calibrate"]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    scale: float = 0.3,
    shape: str = "sigmoid",
    min_temperature: float = 1e-3,
    include_maxpool: bool = False,
    default: Schedule | None = None,
) -> PerChannel:
    """Gather per-channel pre-activation std over ``batches`` and return a :class:`PerChannel` schedule.

    batches: iterable of image tensors (N, C, H, W) (or an image DataLoader yielding tensors or
        (images, labels) pairs). Statistics are over batch and spatial positions, per channel
        (``Site.channel_dim``), at ReLU, SiLU and GELU sites (and max-pool sites with ``include_maxpool``).
    scale: T_c = max(scale * std_c, min_temperature); scale 0.3 matches the paper's T = 0.3 for
        unit-variance pre-activations.
    include_maxpool: also give max-pool sites per-channel softmax temperatures (scale * std of the input).
    default: schedule for sites not seen during calibration (None: such a site raises).
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    sums: dict[str, Tensor] = {}

    def observe(site: Site, z: Tensor, gate: Gate) -> None:
        if site.kind not in PER_CHANNEL_KINDS or (site.kind == "maxpool" and not include_maxpool):
            return  # norm and attention sites have no per-channel temperatures
        if z.dim() < 2:
            raise ValueError(f"cannot calibrate per channel at {site.key}: pre-activation of shape {tuple(z.shape)}")
        zc = z.detach().transpose(0, site.channel_dim).reshape(z.shape[site.channel_dim], -1).double()
        stats = torch.stack([torch.full_like(zc[:, 0], zc.shape[1]), zc.sum(1), (zc * zc).sum(1)])
        sums[site.key] = sums[site.key] + stats if site.key in sums else stats

    engine = Excitation(model, ByType(*(Gate("hard", 0.0),) * 4), observer=observe)
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        check_images(model, x)
        with engine:
            model(x)
        seen += 1
    if not seen:
        raise ValueError("calibrate needs at least one batch of images")
    if not sums:
        raise ValueError("the model made no ReLU, SiLU, GELU or max-pool call: there is nothing to calibrate")
    temps = {}
    for key, (count, total, sq) in sums.items():
        mean = total / count
        std = (sq / count - mean * mean).clamp_min(0).sqrt()
        temps[key] = (scale * std).clamp_min(min_temperature).float()
    meta = {"scale": scale, "batches": seen, "statistic": "std"}
    return PerChannel(temps, shape=shape, default=default, meta=meta)
