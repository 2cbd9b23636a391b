"""Train the digits CNN shipped with the package and write its checkpoint.

    .venv/bin/python scripts/train_digits.py [--epochs 10] [--seed 0] [--threads 1] [--out <checkpoint file>]

Trains :class:`excitation_pullbacks.models.DigitsCNN` on scikit-learn's digits (train split, 32 x 32, [-1, 1])
on the CPU, deterministically for a given seed; prints train/test accuracy per epoch and the final test
accuracy; writes the state dict atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excitation_pullbacks.models.checkpoint import save_state_dict
from excitation_pullbacks.models.digits import CHECKPOINT, DigitsCNN, digits_images


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on images (N, 3, H, W), labels (N,)."""
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
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
        model = train_loop(
            seed=seed,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            shift=shift,
            history=history,
            log=log,
        )
    return model.eval(), history


def train_loop(
    *, seed, x_train, y_train, x_test, y_test, epochs, batch_size, lr, weight_decay, shift, history, log
) -> DigitsCNN:
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
            loss = F.cross_entropy(model(shift_batch(x_train[idx], shift, g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        row = {
            "epoch": epoch,
            "loss": total / len(y_train),
            "train_acc": accuracy(model, x_train, y_train),
            "test_acc": accuracy(model, x_test, y_test),
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        if log is not None:
            log(
                f"epoch {epoch:2d}  loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"test acc {row['test_acc']:.4f}  ({row['seconds']:.1f} s)"
            )
    return model


def shift_batch(x: Tensor, shift: int, g: torch.Generator) -> Tensor:
    """x (B, 3, H, W) translated by one random (dy, dx) in [-shift, shift]^2, background -1 filled in."""
    if shift <= 0:
        return x
    dy, dx = (torch.randint(-shift, shift + 1, (2,), generator=g)).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    return padded[..., shift - dy : shift - dy + h, shift - dx : shift - dx + w]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the fastest for this small net on shared cores; 0: torch's choice)",
    )
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images only (quick runs)")
    p.add_argument("--out", default=str(CHECKPOINT), help="checkpoint path (default: the committed one)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, _ = train_digits_cnn(
        epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size, subset=args.subset
    )
    seconds = time.perf_counter() - start
    x, y = digits_images("test")
    acc = accuracy(model, x, y)
    path = save_state_dict(model, args.out)
    print(
        f"final test accuracy {acc:.4f} ({round(acc * len(y))}/{len(y)}), training {seconds:.1f} s on "
        f"{torch.get_num_threads()} CPU threads; wrote {path} ({path.stat().st_size / 1024:.0f} KiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
