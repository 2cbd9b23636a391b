"""The soft-pool kernel as a torch.library custom op: opcheck, its OpenMP runtime, and compiled graphs calling it."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from excitation_pullbacks import pullback
from excitation_pullbacks.rules import pool_kernel

pytestmark = pytest.mark.skipif(not pool_kernel.available(), reason="no C compiler: the torch path runs")


def test_opcheck():
    """Schema, fake (meta) implementation, and traced use of the op, as torch.library.opcheck checks them."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 9, 11, generator=g, dtype=dtype)
        grad = torch.randn(2, 3, 5, 6, generator=g, dtype=dtype)
        temps = torch.tensor([0.3], dtype=dtype)
        for zero, detach in ((False, False), (True, True)):
            args = (x, grad, temps, [3, 3, 2, 2, 1, 1, 1, 1], zero, detach)
            torch.library.opcheck(torch.ops.excitation_pullbacks.soft_pool_backward.default, args)


def test_one_openmp_runtime_governed_by_torch():
    """In a fresh process: after a pullback through a max-pool, one OpenMP runtime is mapped - torch's - and the
    kernel's parallel regions run on torch.set_num_threads threads."""
    code = """
import re, torch
from torch import nn
from excitation_pullbacks import pullback
from excitation_pullbacks.rules import pool_kernel
m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(), nn.LazyLinear(4)).eval()
m(torch.rand(1, 3, 64, 64))
pullback(m, torch.rand(2, 3, 64, 64), 1)
assert pool_kernel.calls > 0
maps = open("/proc/self/maps").read()
print(sorted(set(re.findall(r"(/\\S*/lib(?:gomp|iomp5|omp)[-\\w.]*\\.so[.\\d]*)\\s*$", maps, re.M))))
counts = []
for n in (1, 2):
    torch.set_num_threads(n)
    counts.append(pool_kernel.threads())
print(counts, torch.__file__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    runtimes, line = done.stdout.strip().splitlines()[-2:]
    runtimes = eval(runtimes)  # a printed list of paths
    counts, torch_file = line.split("] ")
    assert len(runtimes) == 1, runtimes
    assert os.path.realpath(runtimes[0]).startswith(os.path.dirname(os.path.realpath(torch_file))) or re.search(
        r"lib(gomp|iomp5|omp)\.so", runtimes[0]
    )
    assert counts + "]" == "[1, 2]"


def _compiled_calls(model, x, targets):
    compiled = torch.compile(model)
    eager = pullback(model, x, targets)
    before = pool_kernel.calls
    ours = pullback(compiled, x, targets)
    return eager, ours, pool_kernel.calls - before


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_compiled_torchvision_pullback_calls_the_kernel_op(arch):
    """A torch.compile'd model's pullback runs the pool backward through the op (not the torch fallback), once
    per max-pool, and equals the eager pullback (float32: 1e-5 of the largest entry)."""
    model = getattr(tvm, arch)().eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    eager, ours, calls = _compiled_calls(model, x, torch.tensor([1, 3]))
    assert calls == {"resnet18": 1, "vgg11_bn": 5}[arch]
    assert (ours - eager).abs().max() <= 1e-5 * eager.abs().max()
    assert F.cosine_similarity(ours.flatten(), eager.flatten(), dim=0) > 1 - 1e-6
