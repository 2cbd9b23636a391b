"""Pullback backward passes free of subnormal floats, the caller's float state restored, the results unchanged
beyond float32 rounding."""

import pytest
import torch
import torchvision.models as tvm

from excitation_pullbacks import pullback
from excitation_pullbacks.options import as_schedule
from excitation_pullbacks.pullback import engine_for, frozen_parameters
from excitation_pullbacks.rules import pool_kernel
from excitation_pullbacks.subnormals import no_subnormals

pytestmark = pytest.mark.skipif(
    not pool_kernel.available() or pool_kernel.denormals_flushed() is None, reason="no native library here"
)
SUBNORMAL = 1e-20  # squared: 1e-40, below float32's smallest normal 1.2e-38


def _subnormals_survive() -> bool:
    """Whether a large (multi-threaded) multiplication still produces subnormal floats."""
    x = torch.full((1 << 20,), SUBNORMAL)
    return bool((x * x).count_nonzero() == x.numel())


@pytest.mark.parametrize("user", [False, True])
def test_users_flush_state_is_restored(user):
    if not torch.set_flush_denormal(user):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3)
        )
        model(torch.rand(1, 3, 8, 8))
        pullback(model.eval(), torch.rand(2, 3, 8, 8), 1)
        assert pool_kernel.denormals_flushed() is user  # the calling thread's state, as the user set it
        assert _subnormals_survive() is not user  # and the worker threads'
    finally:
        torch.set_flush_denormal(False)


def test_block_flushes_every_thread_and_restores():
    torch.set_num_threads(2)
    assert _subnormals_survive()
    with no_subnormals(torch.float32):
        assert not _subnormals_survive()  # calling thread and the OpenMP team
        assert pool_kernel.denormals_flushed()
    assert _subnormals_survive() and not pool_kernel.denormals_flushed()
    with no_subnormals(torch.float64):  # float64 work is left alone
        assert _subnormals_survive()
    with pytest.raises(RuntimeError), no_subnormals(torch.float32):
        raise RuntimeError("inside")
    assert _subnormals_survive()


def test_pullback_equals_the_unflushed_backward():
    """The bound: flushing changes a ResNet18 pullback by no more than float32 rounding."""
    torch.manual_seed(0)
    model = tvm.resnet18().eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ours = pullback(model, x, 7, temperature=0.1)
    engine = engine_for(model, as_schedule(temperature=0.1))
    with frozen_parameters(model):
        xr = x.clone().requires_grad_(True)
        with engine:
            out = model(xr)
        (plain,) = torch.autograd.grad(out[:, 7].sum(), xr)  # no flush
    assert (ours - plain).abs().max() <= 1e-6 * plain.abs().max()
