"""A small ReLU + BatchNorm + max-pool CNN trained on scikit-learn's 8 x 8 digits, shipped with the package.

It lets the figures and metrics run on a trained network where no ImageNet weights can be downloaded.
Images are the digits upscaled to ``size`` x ``size``, replicated to 3 channels, in [-1, 1] (ink is +1), so
the model takes the same kind of input as the ImageNet models behind :class:`~excitation_pullbacks.ImageNetInput`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DigitsCNN", "CHECKPOINT", "digits_images", "load_digits_cnn", "train_digits_cnn",
           "accuracy", "save_state_dict"]

#: The committed checkpoint (a state dict of ``DigitsCNN()``).
CHECKPOINT = Path(__file__).parent / "weights" / "digits_cnn.pt"

SPLIT_SEED = 0        # seeds the fixed train/test permutation
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
    from sklearn.datasets import load_digits

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

    checkpoint: a state dict file (or a dict holding one under ``state_dict``).
    """
    path = CHECKPOINT if checkpoint is None else Path(os.path.expanduser(str(checkpoint)))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = DigitsCNN()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on images (N, 3, H, W), labels (N,)."""
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return correct / len(labels)


def train_digits_cnn(
    *,
    epochs: int = 10,
    seed: int = 0,
    size: int = 32,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    shift: int = 2,
    subset: int | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[DigitsCNN, list[dict]]:
    """Train a :class:`DigitsCNN` on the train split, deterministically for a given seed (CPU).

    Adam with a cosine learning-rate decay; each batch is shifted by up to ``shift`` pixels (zero-padded
    with the background -1). subset: train on the first ``subset`` training images only (for quick tests).
    The global RNG state is left as it was. Returns the model in eval mode and one dict per epoch:
    {"epoch", "loss", "train_acc", "test_acc", "seconds"}.
    """
    x_train, y_train = digits_images("train", size)
    x_test, y_test = digits_images("test", size)
    if subset is not None:
        x_train, y_train = x_train[:subset], y_train[:subset]
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        model = _train(seed=seed, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, epochs=epochs,
                       batch_size=batch_size, lr=lr, weight_decay=weight_decay, shift=shift, history=history, log=log)
    return model.eval(), history


def _train(*, seed, x_train, y_train, x_test, y_test, epochs, batch_size, lr, weight_decay, shift, history,
           log) -> DigitsCNN:
    """The training loop of :func:`train_digits_cnn`; appends one dict per epoch to ``history``."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(y_train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(y_train), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_shift(x_train[idx], shift, g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "loss": total / len(y_train), "train_acc": accuracy(model, x_train, y_train),
               "test_acc": accuracy(model, x_test, y_test), "seconds": time.perf_counter() - start}
        history.append(row)
        if log is not None:
            log(f"epoch {epoch:2d}  loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"test acc {row['test_acc']:.4f}  ({row['seconds']:.1f} s)")
    return model


def _shift(x: Tensor, shift: int, g: torch.Generator) -> Tensor:
    """x (B, 3, H, W) translated by one random (dy, dx) in [-shift, shift]^2, background -1 filled in."""
    if shift <= 0:
        return x
    dy, dx = (torch.randint(-shift, shift + 1, (2,), generator=g)).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    return padded[..., shift - dy:shift - dy + h, shift - dx:shift - dx + w]


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path
