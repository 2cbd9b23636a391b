"""A small ReLU + BatchNorm + max-pool CNN trained on scikit-learn's 8 x 8 digits, shipped with the package.

It lets the figures and metrics run on a trained network where no ImageNet weights can be downloaded.
Images are the digits upscaled to ``size`` x ``size``, replicated to 3 channels, in [-1, 1] (ink is +1), so
the model takes the same kind of input as the ImageNet models behind :class:`~excitation_pullbacks.ImageNetInput`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_state_dict

__all__ = [
    "CHECKPOINT",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "DigitsCNN",
    "digits_images",
    "load_digits_cnn",
    "save_state_dict",
]

#: The committed checkpoint (a state dict of ``DigitsCNN()``).
CHECKPOINT = Path(__file__).parent / "weights" / "digits_cnn.pt"

SPLIT_SEED = 0  # seeds the fixed train/test permutation
TEST_FRACTION = 0.25  # 449 of the 1797 images are held out


class DigitsCNN(nn.Module):
    """A fixed 1x1 conv to grey, three conv3x3-BN-ReLU-maxpool2 blocks, a 4 x 4 adaptive average pool, a linear head.

    forward: x (N, 3, H, W) in [-1, 1] (H = W = 32 as trained; any size >= 8 runs) -> logits (N, 10).
    The digits are grey, so ``grey`` (not trained) takes the mean of the 3 channels: colour directions, which
    training never sees, then carry no untrained random gradient, and pullbacks and ascent stay grey.
    Per forward pass: 3 ReLU calls (``features.2``, ``.6``, ``.10``) and 3 max-pool calls (``.3``, ``.7``, ``.11``).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.grey = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.grey.weight, 1 / 3)
        self.grey.weight.requires_grad_(False)
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # the identity for 32 x 32 inputs
        self.classifier = nn.Linear(c_in * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(self.grey(x))).flatten(1))


@lru_cache(maxsize=1)
def _raw() -> tuple[Tensor, Tensor]:
    """-> images (1797, 8, 8) in [0, 16] float32, labels (1797,) int64 (scikit-learn's bundled copy)."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes seconds to import; only the data needs it

    d = load_digits()
    return torch.from_numpy(d.images).float(), torch.from_numpy(d.target).long()


def _split_indices(split: str, n: int) -> Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(n * TEST_FRACTION)
    if split == "test":
        return order[:n_test].sort().values
    if split == "train":
        return order[n_test:].sort().values
    if split == "all":
        return torch.arange(n)
    raise ValueError(f"unknown digits split {split!r}; choose train, test or all")


def digits_images(split: str = "test", size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as 3-channel images.

    split: "train" (1348 images), "test" (449, held out from training) or "all" (1797); the split is a fixed
    seeded permutation, the same on every machine. size: side length after bilinear upsampling from 8.
    Returns images (N, 3, size, size) float32 in [-1, 1] (background -1, ink up to +1), labels (N,) int64,
    in the dataset's order.
    """
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    raw, labels = _raw()
    idx = _split_indices(split, len(labels))
    x = raw[idx, None] / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    x = F.interpolate(x, size=(int(size), int(size)), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), labels[idx].clone()


def load_digits_cnn(checkpoint: str | os.PathLike | None = None) -> DigitsCNN:
    """A :class:`DigitsCNN` in eval mode with the weights in ``checkpoint`` (default: the committed one).

    checkpoint: a state dict file (or a dict holding one under ``state_dict``); errors as
    :func:`~excitation_pullbacks.models.checkpoint.load_checkpoint`.
    """
    return load_checkpoint(DigitsCNN(), CHECKPOINT if checkpoint is None else checkpoint).eval()
