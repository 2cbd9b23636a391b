"""The max-pool surrogate: exact max forward, softmax-pool gradient (paper Sec. 6.3, Listing 2)."""

import pytest
import torch
import torch.nn.functional as F

from excitation_pullbacks import Gate, soft_max_pool2d
from excitation_pullbacks.rules.pool import pool_geometry, soft_pool_backward

from reference import soft_pool_reference

GEOMETRIES = [
    # kernel, stride, padding, dilation, ceil_mode
    (2, 2, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    (3, 1, 0, 2, False),
    ((2, 3), (1, 2), (1, 0), 1, True),
    ((3, 2), None, (1, 1), (2, 1), False),
    (3, 3, 1, 1, True),
    (2, 1, 1, (1, 2), True),
]


class _Probe(torch.autograd.Function):
    """Forward: the reference soft pool; backward: the engine's pool backward. gradcheck compares the
    engine's backward with finite differences of the soft-pool formula."""

    @staticmethod
    def forward(ctx, x, gate, geometry, ceil_mode):
        k, s, p, d = pool_geometry(*geometry)
        ctx.save_for_backward(x, F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode))
        ctx.args = (gate, k, s, p, d)
        return soft_pool_reference(x, k, s, p, d, ceil_mode, gate.temperature, detach=False)

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        return soft_pool_backward(x, out, grad, *ctx.args), None, None, None


def _x(shape=(2, 3, 7, 6), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_forward_is_exact_max(geometry):
    k, s, p, d, ceil = geometry
    x = _x()
    out = soft_max_pool2d(x, Gate("softmax", 0.3), k, s, p, d, ceil_mode=ceil)
    assert torch.equal(out, F.max_pool2d(x, k, s, p, d, ceil_mode=ceil))
    out, idx = soft_max_pool2d(x, Gate("softmax", 0.3), k, s, p, d, ceil_mode=ceil, return_indices=True)
    ref_out, ref_idx = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("temperature", [0.3, 1.5])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_gradient_is_soft_pool_gradient(geometry, temperature):
    k, s, p, d, ceil = geometry
    x = _x(seed=3).requires_grad_(True)
    gate = Gate("softmax", temperature)
    assert torch.autograd.gradcheck(lambda t: _Probe.apply(t, gate, (k, s, p, d), ceil), (x,))
    # ... and equals autograd through the formula, for both the paper's and the detached weights.
    for detach in (False, True):
        g = torch.randn(F.max_pool2d(x, k, s, p, d, ceil_mode=ceil).shape, dtype=torch.float64)
        (ours,) = torch.autograd.grad(
            soft_max_pool2d(x, Gate("softmax", temperature, detach=detach), k, s, p, d, ceil), x, g
        )
        (ref,) = torch.autograd.grad(soft_pool_reference(x, k, s, p, d, ceil, temperature, detach), x, g)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_detached_and_full_weights_differ():
    x = _x().requires_grad_(True)
    a, b = (
        torch.autograd.grad(soft_max_pool2d(x, Gate("softmax", 0.3, detach=dt), 3, 2, 1).sum(), x)[0]
        for dt in (False, True)
    )
    assert not torch.allclose(a, b)
    # detached softmax weights sum to 1 over each window: the gradient sums to the number of outputs
    torch.testing.assert_close(b.sum().item(), float(F.max_pool2d(x, 3, 2, 1).numel()))


def test_per_channel_temperatures():
    x = _x().requires_grad_(True)
    temps = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    (ours,) = torch.autograd.grad(soft_max_pool2d(x, Gate("softmax", temps), 3, 2, 1).sum(), x)
    for c, t in enumerate(temps.tolist()):
        (ref,) = torch.autograd.grad(soft_pool_reference(x[:, c : c + 1], 3, 2, 1, 1, False, t).sum(), x)
        torch.testing.assert_close(ours[:, c], ref[:, c], rtol=1e-10, atol=1e-12)


def test_limits_hard_and_uniform():
    x = _x().requires_grad_(True)
    hard = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).sum(), x)[0]
    assert torch.equal(torch.autograd.grad(soft_max_pool2d(x, Gate("softmax", 0.0), 3, 2, 1).sum(), x)[0], hard)
    # T -> inf: uniform weights over the valid part of each window (average pool without padding).
    avg = torch.autograd.grad(F.avg_pool2d(x, 3, 2, 1, count_include_pad=False).sum(), x)[0]
    for gate in (Gate("none"), Gate("softmax", float("inf"))):
        torch.testing.assert_close(torch.autograd.grad(soft_max_pool2d(x, gate, 3, 2, 1).sum(), x)[0], avg)
    # small T approaches the hard gradient (no ties in random data)
    cold = torch.autograd.grad(soft_max_pool2d(x, Gate("softmax", 1e-3), 3, 2, 1).sum(), x)[0]
    torch.testing.assert_close(cold, hard, atol=1e-6, rtol=0)


def test_unbatched_input_and_float32():
    x = _x((3, 8, 8)).float().requires_grad_(True)
    out = soft_max_pool2d(x, Gate("softmax", 0.3), 2)
    assert out.shape == (3, 4, 4)
    (g,) = torch.autograd.grad(out.sum(), x)
    (ref,) = torch.autograd.grad(soft_pool_reference(x[None], 2, temperature=0.3).sum(), x)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_large_values_stay_finite():
    """Per-window shift by the max: no overflow even where x / T is far beyond exp's range."""
    x = (_x() * 1000).requires_grad_(True)
    (g,) = torch.autograd.grad(soft_max_pool2d(x.float(), Gate("softmax", 0.3), 3, 2, 1).sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 9, 7)])
@pytest.mark.parametrize("detach", [False, True])
def test_tiling_windows_fast_path(shape, detach):
    """Stride == kernel (VGG's pools), with leftover rows/columns that no window covers."""
    x = _x(shape, seed=5).requires_grad_(True)
    temps = [0.3, torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)]
    for t in temps:
        (ours,) = torch.autograd.grad(soft_max_pool2d(x, Gate("softmax", t, detach=detach), 2).sum(), x)
        for c in range(3):
            tc = t if isinstance(t, float) else float(t[c])
            (ref,) = torch.autograd.grad(
                soft_pool_reference(x[:, c : c + 1], 2, temperature=tc, detach=detach).sum(), x
            )
            torch.testing.assert_close(ours[:, c], ref[:, c], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: _Probe.apply(v, Gate("softmax", 0.3), (2, 2, 0, 1), False), (x,))
