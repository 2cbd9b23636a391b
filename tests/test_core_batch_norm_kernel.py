"""The one-pass CPU kernel of the in-place soft ReLU of a frozen BatchNorm output (rules.batch_norm_kernel):
agreement with the torch ops it replaces, where it applies, and its use inside a pullback."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from excitation_pullbacks import Gate, excitation, pullback
from excitation_pullbacks.rules import batch_norm_kernel, pool_kernel
from excitation_pullbacks.rules.activations import gated_grad

pytestmark = pytest.mark.skipif(not pool_kernel.available(), reason="no C compiler for the kernels")

#: relative bound on the kernel's difference from the torch path: the exponential differs by an ulp or two
TOL = {torch.float32: 1e-6, torch.float64: 1e-14}


def _case(dtype, addend, affine, shape=(3, 8, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3
    c = shape[1]
    mean, var = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.05
    weight = torch.randn(c, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(c, generator=g, dtype=dtype) if affine else None
    addends = (torch.randn(shape, generator=g, dtype=dtype),) if addend else ()
    grad = torch.randn(shape, generator=g, dtype=dtype)
    return x, mean, var, weight, bias, addends, grad


def _torch_z(x, mean, var, weight, bias, eps, addends):
    z = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    for a in addends:
        z.add_(a)
    return z


def _torch_path(grad, gate, x, mean, var, weight, bias, eps, addends):
    return gated_grad(grad, _torch_z(x, mean, var, weight, bias, eps, addends), gate, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("addend", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 0.3, 2.0])
def test_kernel_agrees_with_the_torch_ops(dtype, addend, affine, temperature):
    x, mean, var, weight, bias, addends, grad = _case(dtype, addend, affine)
    gate = Gate("sigmoid", temperature)
    before = batch_norm_kernel.calls
    got = batch_norm_kernel.soft_relu_grad(grad, gate, x, mean, var, weight, bias, 1e-5, addends)
    assert batch_norm_kernel.calls == before + 1
    ref = _torch_path(grad, gate, x, mean, var, weight, bias, 1e-5, addends)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    # every entry to a few ulps of the torch path; at and below z / T = LOW the gate is 0 instead of a number
    # below exp(LOW) (about the smallest normal number)
    tail = math.exp(batch_norm_kernel.LOW[dtype]) * grad.abs()
    assert ((got - ref).abs() <= TOL[dtype] * ref.abs() + tail).all()
    if temperature == 0.05:  # the cases reach far into the upper tail, and in float32 into the lower one
        u = _torch_z(x, mean, var, weight, bias, 1e-5, addends) / temperature
        assert (u > batch_norm_kernel.THRESHOLD[dtype]).any()
        assert dtype == torch.float64 or (u < batch_norm_kernel.LOW[dtype]).any()
        assert (got[u < batch_norm_kernel.LOW[dtype]] == 0).all()
        assert torch.equal(got[u > batch_norm_kernel.THRESHOLD[dtype]], grad[u > batch_norm_kernel.THRESHOLD[dtype]])


def test_kernel_threads_give_the_same_bits():
    x, mean, var, weight, bias, addends, grad = _case(torch.float32, True, True, shape=(4, 16, 40, 40))
    gate = Gate("sigmoid", 0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batch_norm_kernel.soft_relu_grad(grad, gate, x, mean, var, weight, bias, 1e-5, addends)
        torch.set_num_threads(2)
        two = batch_norm_kernel.soft_relu_grad(grad, gate, x, mean, var, weight, bias, 1e-5, addends)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "change",
    ["per_channel_t", "zero_t", "inf_t", "normal_cdf", "strided", "two_addends", "half", "switched_off"],
)
def test_kernel_steps_aside_where_it_does_not_apply(change, monkeypatch):
    x, mean, var, weight, bias, addends, grad = _case(torch.float32, True, True)
    gate = Gate("sigmoid", 0.3)
    if change == "per_channel_t":
        gate = Gate("sigmoid", torch.full((8,), 0.3))
    elif change == "zero_t":
        gate = Gate("sigmoid", 0.0)
    elif change == "inf_t":
        gate = Gate("sigmoid", float("inf"))
    elif change == "normal_cdf":
        gate = Gate("normal_cdf", 0.3)
    elif change == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif change == "two_addends":
        addends = addends * 2
    elif change == "half":
        x, grad, addends = x.half(), grad.half(), tuple(a.half() for a in addends)
        mean, var, weight, bias = (p.half() for p in (mean, var, weight, bias))
    elif change == "switched_off":
        monkeypatch.setenv("EXCITATION_PULLBACKS_BN_KERNEL", "0")
    assert batch_norm_kernel.soft_relu_grad(grad, gate, x, mean, var, weight, bias, 1e-5, addends) is None


class _Block(nn.Module):
    """conv -> BN -> ReLU (in place), conv -> BN, + shortcut, ReLU (in place): both in-place sites of a
    residual block, the second with the residual sum as its addend."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.short = nn.Conv2d(3, c, 1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return self.head(self.relu(out).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pullback_uses_the_kernel_and_agrees_with_the_torch_path(dtype, monkeypatch):
    torch.manual_seed(0)
    model = _Block().to(dtype).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    with torch.no_grad():
        plain = model(x)
    with excitation(model, temperature=0.3, lean_batchnorm=True), torch.no_grad():
        assert torch.equal(model(x), plain)
    before = batch_norm_kernel.calls
    got = pullback(model, x, [1, 3], temperature=0.3)
    assert batch_norm_kernel.calls == before + 2  # both in-place ReLUs of BatchNorm outputs
    monkeypatch.setenv("EXCITATION_PULLBACKS_BN_KERNEL", "0")
    ref = pullback(model, x, [1, 3], temperature=0.3)
    assert batch_norm_kernel.calls == before + 2
    assert (got - ref).abs().max() <= 10 * TOL[dtype] * ref.abs().max()
