"""Localisation: how much of the positive relevance lies where the evidence for the target is?"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["focus", "quadrant_masks"]


def quadrant_masks(quadrants: Tensor, height: int, width: int) -> Tensor:
    """quadrants (N, 4) flags in the order top-left, top-right, bottom-left, bottom-right -> (N, 1, H, W)
    masks (the top / left halves are H // 2 rows / W // 2 columns, as Quantus splits a mosaic)."""
    q = torch.as_tensor(quadrants)
    if q.dim() != 2 or q.shape[1] != 4:
        raise ValueError(f"quadrants must have shape (N, 4), got {tuple(q.shape)}")
    top = torch.arange(height, device=q.device) < height // 2
    left = torch.arange(width, device=q.device) < width // 2
    index = (~top).long()[:, None] * 2 + (~left).long()[None, :]  # (H, W) quadrant of each pixel
    return q[:, index][:, None]


def focus(relevance: Tensor, quadrants: Tensor, *, eps: float = 1e-9) -> Tensor:
    """Focus (Arias-Duart et al. 2022), as Quantus ``Focus``. **Higher is better.**

    relevance: (N, C, H, W) or (N, H, W) maps of 2 x 2 mosaics (the published protocol passes
    input x attribution, with neither absolute values nor normalisation); quadrants: (N, 4) 0/1 flags, 1
    where the quadrant shows the target class (order: top-left, top-right, bottom-left, bottom-right).
    Score: the positive relevance inside the target quadrants over all positive relevance (+ eps).
    Returns (N,) in [0, 1].
    """
    if relevance.dim() == 3:
        relevance = relevance[:, None]
    r = relevance.detach().clamp_min(0)
    mask = quadrant_masks(quadrants.to(r.device), r.shape[-2], r.shape[-1]).to(r.dtype)
    return (r * mask).flatten(1).sum(1) / (r.flatten(1).sum(1) + eps)
