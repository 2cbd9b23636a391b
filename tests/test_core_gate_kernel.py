"""The one-pass CPU kernel of the normal-CDF gate's backward (rules.gate_kernel): accuracy against an
independent Phi (SciPy's ndtr), agreement with the torch ops it replaces, where it applies, and its use in a
pullback."""

import numpy as np
import pytest
import scipy.special
import torch
from torch import nn

from excitation_pullbacks import Gate, pullback
from excitation_pullbacks.rules import gate_kernel, pool_kernel

pytestmark = pytest.mark.skipif(not pool_kernel.available(), reason="no C compiler for the kernels")


def _case(dtype, shape=(3, 17, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype) * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 3.0])
def test_kernel_matches_an_independent_normal_cdf(dtype, temperature):
    grad, z = _case(dtype)
    gate = Gate("normal_cdf", temperature)
    before = gate_kernel.calls
    got = gate_kernel.normal_cdf_grad(grad, z, gate)
    assert gate_kernel.calls == before + 1 and got.shape == z.shape and got.dtype == dtype
    u = z.double().numpy() / np.float64(np.asarray(temperature, dtype=z.numpy().dtype))
    truth = torch.from_numpy(grad.double().numpy() * scipy.special.ndtr(u))
    err = (got.double() - truth).abs()
    ulp = torch.finfo(dtype).eps
    normal = truth.abs() > 1e3 * torch.finfo(dtype).tiny
    # relative to the value, the tail included (where 1 + erf rounds to 0): a few ulps, times the tail's
    # condition number u^2 (d log Phi / du ~ |u|, and u = z / T itself carries |u| ulps of rounding)
    bound = (8 + 4 * torch.from_numpy(u) ** 2) * ulp * truth.abs()
    assert (err <= bound)[normal].all()
    low, high = gate_kernel.RANGE[dtype]  # erfc's argument is -u / sqrt 2: past the range the gate is 1 or 0
    v = -torch.from_numpy(u) / 2**0.5
    assert torch.equal(got[v < low], grad[v < low]) and (got[v > high] == 0).all()
    # and the torch path (1 + erf(u / sqrt 2)) / 2 agrees to its own absolute rounding
    ref = gate(z).mul_(grad)
    assert (got - ref).abs().max() <= 8 * ulp * grad.abs().max()


@pytest.mark.parametrize("change", ["per_channel_t", "zero_t", "sigmoid", "tanh", "strided", "half", "switched_off"])
def test_kernel_steps_aside_where_it_does_not_apply(change, monkeypatch):
    grad, z = _case(torch.float32)
    gate = Gate("normal_cdf", 0.5)
    if change == "per_channel_t":
        gate = Gate("normal_cdf", torch.full((40,), 0.5))
    elif change == "zero_t":
        gate = Gate("normal_cdf", 0.0)
    elif change == "sigmoid":
        gate = Gate("sigmoid", 0.5)
    elif change == "tanh":
        gate = Gate("normal_cdf_tanh", 0.5)
    elif change == "strided":
        z = z.transpose(1, 2).contiguous().transpose(1, 2)
    elif change == "half":
        grad, z = grad.half(), z.half()
    elif change == "switched_off":
        monkeypatch.setenv("EXCITATION_PULLBACKS_GATE_KERNEL", "0")
    assert gate_kernel.normal_cdf_grad(grad, z, gate) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_pullback_uses_the_kernel_and_agrees_with_the_torch_path(dtype, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GELU(), nn.Flatten(1), nn.Linear(8 * 6 * 6, 16), nn.GELU(), nn.Linear(16, 5)
    ).to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    before = gate_kernel.calls
    got = pullback(model, x, [0, 4], smooth_temperature=0.5)
    assert gate_kernel.calls == before + 2  # both GELU sites
    monkeypatch.setenv("EXCITATION_PULLBACKS_GATE_KERNEL", "0")
    ref = pullback(model, x, [0, 4], smooth_temperature=0.5)
    assert gate_kernel.calls == before + 2
    assert (got - ref).abs().max() <= 64 * torch.finfo(dtype).eps * ref.abs().max()
