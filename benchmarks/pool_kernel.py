"""The soft-pool kernel on 2 x 2 stride-2 windows: the loop for windows that tile the plane against the general
loops, on one CPU thread.

For each shape (N, C, H, W) the general loops run on a plane one row and one column larger (the extra row and
column lie outside every window: the same windows, the same numbers, which the script checks bit for bit).
Shapes: the digits CNN's three pools at batch 1 and VGG11_BN's first pool at batch 16.

Run: ``.venv/bin/python benchmarks/pool_kernel.py [--repeats 300]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from functools import partial

import torch

from excitation_pullbacks.rules import pool_kernel

SHAPES = [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8), (16, 64, 224, 224)]


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    if not pool_kernel.available():
        raise SystemExit("error: the soft-pool kernel is not available here (no C compiler?)")
    torch.set_num_threads(1)
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()}")
    print("| dtype | shape | tiling loop us | general loops us | ratio |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    args_ = (0.3, (2, 2), (2, 2), (0, 0), (1, 1))
    for dtype in (torch.float32, torch.float64):
        for n, c, h, w in SHAPES:
            larger = torch.randn(n, c, h + 1, w + 1, generator=g, dtype=dtype)
            x = larger[:, :, :h, :w].contiguous()
            grad = torch.randn(n, c, h // 2, w // 2, generator=g, dtype=dtype)
            tiled = pool_kernel.pool_backward(x, grad, *args_, zero=False, detach=False)
            general = pool_kernel.pool_backward(larger, grad, *args_, zero=False, detach=False)
            assert torch.equal(tiled, general[:, :, :h, :w]), "the two loops disagree"
            repeats = args.repeats if n * c * h * w < 1 << 20 else max(3, args.repeats // 60)
            a = median_us(partial(pool_kernel.pool_backward, x, grad, *args_, zero=False, detach=False), repeats)
            b = median_us(partial(pool_kernel.pool_backward, larger, grad, *args_, zero=False, detach=False), repeats)
            print(f"| {str(dtype)[6:]} | {n}x{c}x{h}x{w} | {a:.1f} | {b:.1f} | {b / a:.2f}x |", flush=True)
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()}")


if __name__ == "__main__":
    main()
