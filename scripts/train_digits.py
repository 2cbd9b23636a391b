"""Train the digits CNN shipped with the package and write its checkpoint.

    .venv/bin/python scripts/train_digits.py [--epochs 10] [--seed 0] [--threads 1] [--out <checkpoint file>]

Trains :class:`excitation_pullbacks.digits.DigitsCNN` on scikit-learn's digits (train split, 32 x 32, [-1, 1])
on the CPU, deterministically for a given seed; prints train/test accuracy per epoch and the final test
accuracy; writes the state dict atomically.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from excitation_pullbacks.digits import CHECKPOINT, accuracy, digits_images, save_state_dict, train_digits_cnn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the fastest for this small net on shared cores; 0: torch's choice)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images only (quick runs)")
    p.add_argument("--out", default=str(CHECKPOINT), help="checkpoint path (default: the committed one)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, _ = train_digits_cnn(epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
                                subset=args.subset)
    seconds = time.perf_counter() - start
    x, y = digits_images("test")
    acc = accuracy(model, x, y)
    path = save_state_dict(model, args.out)
    print(f"final test accuracy {acc:.4f} ({int(round(acc * len(y)))}/{len(y)}), training {seconds:.1f} s on "
          f"{torch.get_num_threads()} CPU threads; wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
