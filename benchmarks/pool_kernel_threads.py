"""The soft-pool kernel op at 1 and 2 threads (torch.set_num_threads governs it: it runs on torch's OpenMP
runtime), and which OpenMP runtimes are mapped after a pullback.

Run: .venv/bin/python benchmarks/pool_kernel_threads.py
"""

from __future__ import annotations

import re
import statistics
import time

import torch
import torchvision.models as tvm

from excitation_pullbacks import pullback
from excitation_pullbacks.rules import pool_kernel


def main() -> None:
    model = tvm.resnet18().eval()
    pullback(model, torch.rand(2, 3, 64, 64) * 2 - 1, 1)
    with open("/proc/self/maps") as f:
        maps = f.read()
    found = sorted(set(re.findall(r"(/\S*/lib(?:gomp|iomp5|omp)[-\w.]*\.so[.\d]*)\s*$", maps, re.MULTILINE)))
    print("OpenMP runtimes mapped after a pullback:", found)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 112, 112, generator=g)  # ResNet50's max-pool input at batch 16, 224 px
    grad = torch.randn(16, 64, 56, 56, generator=g)
    temps = torch.tensor([0.3])
    before = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            pool_kernel.soft_pool_backward(x, grad, temps, [3, 3, 2, 2, 1, 1, 1, 1], False, False)
            times.append(time.perf_counter() - start)
        print(f"threads {n}: kernel reports {pool_kernel.threads()} threads, median {statistics.median(times):.4f} s")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
