"""The soft-pool kernel as a torch.library custom op: opcheck, its OpenMP runtime, and compiled graphs calling it."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from excitation_pullbacks import Gate, pullback
from excitation_pullbacks.rules import pool_kernel
from excitation_pullbacks.rules.pool import torch_pool_backward

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


def test_opcheck_of_the_batch_norm_and_gelu_kernels_ops():
    """The ops a replay's capture traces the BatchNorm soft-ReLU and normal-CDF gate kernels as."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x, grad, addend = (torch.randn(2, 3, 4, 5, generator=g, dtype=dtype) for _ in range(3))
        alpha, mean, bias = (torch.rand(3, generator=g, dtype=dtype) + 0.5 for _ in range(3))
        for a, b in ((addend, bias), (None, None)):
            args = (x, a, grad, alpha, mean, b, 1 / 0.3)
            torch.library.opcheck(torch.ops.excitation_pullbacks.soft_relu_batch_norm_grad.default, args)
        args = (x, grad, -1 / (0.6 * 2**0.5))
        torch.library.opcheck(torch.ops.excitation_pullbacks.normal_cdf_gate_grad.default, args)


def test_one_openmp_runtime_governed_by_torch():
    """In a fresh process: after a pullback through a max-pool, one OpenMP runtime is mapped - torch's - and the
    kernel's parallel regions run on torch.set_num_threads threads."""
    code = """
import re, torch
from torch import nn
from excitation_pullbacks import Gate, pullback
from excitation_pullbacks.rules import pool_kernel
from excitation_pullbacks.rules.pool import torch_pool_backward
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


@pytest.mark.parametrize("dtype, low", [(torch.float32, -87.0), (torch.float64, -708.0)])
def test_window_terms_below_the_smallest_normal_weight_are_exact_zeros(dtype, low):
    """Where (x - window max) / T <= LOW (exp(LOW) about the dtype's smallest normal number) the kernel's
    weight is exactly 0; the torch path's is at most exp(LOW) there, so the two agree to float precision on
    every entry (both detach settings, excluded and zero padding)."""
    g = torch.Generator().manual_seed(3)
    t = 0.5
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=dtype)
    far = torch.rand(x.shape, generator=g) < 0.3
    x[far] = (low - 8) * t  # below every window max by more than LOW: exp would be subnormal
    grad = torch.randn(2, 3, 5, 4, generator=g, dtype=dtype)
    k, s, p, d = (3, 3), (2, 2), (1, 1), (1, 1)
    out = F.max_pool2d(x, k, s, p, d)
    for zero, detach in ((False, False), (True, True), (False, True)):
        gate = Gate(temperature=t, detach=detach, padding="zero" if zero else "exclude")
        ours = pool_kernel.pool_backward(x, grad, t, k, s, p, d, zero=zero, detach=detach)
        torch_path = torch_pool_backward(x, out, grad, gate, k, s, p, d)
        assert torch.equal(ours[far], torch.zeros_like(ours[far]))
        tiny = torch.finfo(dtype).tiny
        assert torch_path[far].abs().max() <= 4 * tiny * grad.abs().max()
        eps = torch.finfo(dtype).eps
        assert torch.allclose(ours, torch_path, rtol=64 * eps, atol=64 * eps * grad.abs().max().item())


@pytest.mark.parametrize("dtype, low", [(torch.float32, -87.0), (torch.float64, -708.0)])
def test_tiling_two_by_two_windows_give_the_general_loops_numbers_bit_for_bit(dtype, low):
    """2 x 2 windows at stride 2 that tile the plane run a loop of their own; a plane one row and column
    larger (the last ones outside every window) takes the general loops: the shared entries are the same bits,
    NaNs, clamped terms and both detach settings included, and the extra row and column get 0."""
    g = torch.Generator().manual_seed(4)
    t = 0.3
    x = torch.randn(2, 5, 13, 11, generator=g, dtype=dtype) * 3
    x[torch.rand(x.shape, generator=g) < 0.2] = (low - 8) * t
    x[0, 1, 2, 3] = float("nan")
    grad = torch.randn(2, 5, 6, 5, generator=g, dtype=dtype)
    tiled = x[:, :, :12, :10].contiguous()
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for detach in (False, True):
        args = (t, (2, 2), (2, 2), (0, 0), (1, 1))
        ours = pool_kernel.pool_backward(tiled, grad, *args, zero=False, detach=detach)
        general = pool_kernel.pool_backward(x, grad, *args, zero=False, detach=detach)
        assert torch.equal(ours.view(bits), general[:, :, :12, :10].contiguous().view(bits))
        assert not general[:, :, 12:].any() and not general[:, :, :, 10:].any()
