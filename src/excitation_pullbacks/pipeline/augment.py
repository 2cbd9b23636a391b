"""Random image augmentations of a training batch, drawn from a caller's generator (seeded per step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_flip", "random_shift"]


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """x (B, C, H, W) translated by one random (dy, dx) in [-shift, shift]^2, the background -1 filled in."""
    if shift <= 0:
        return x
    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    return padded[..., shift - dy : shift - dy + h, shift - dx : shift - dx + w]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """x (B, C, H, W), mirrored left-right with probability 1/2 (one coin for the batch)."""
    return x.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else x
