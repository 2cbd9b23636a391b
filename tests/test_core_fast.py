"""The engine's fast paths against their plain-torch fallbacks, float64: the same gradients."""

import pytest
import torch

from excitation_pullbacks import Gate, soft_max_pool2d, soft_relu, surrogates


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pool_grad(x, gate, k, s, p, d=1, ceil=False, inplace_relu=False):
    xr = x.clone().requires_grad_(True)
    out = soft_max_pool2d(xr, gate, k, s, p, d, ceil_mode=ceil)
    out = torch.relu_(out) if inplace_relu else torch.relu(out)
    w = _x(out.shape, seed=9)
    (g,) = torch.autograd.grad((out * w).sum(), xr)
    return g


GATES = [
    Gate("softmax", 0.3),
    Gate("softmax", 0.7, detach=True),
    Gate("softmax", 0.3, padding="zero"),
    Gate("softmax", torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)),
    Gate("none"),
]


@pytest.mark.parametrize("gate", GATES, ids=repr)
@pytest.mark.parametrize(
    "geometry", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 0, 2, False)]
)
def test_chunked_pool_backward_equals_one_chunk(gate, geometry, monkeypatch):
    """Planes in chunks (tiny chunks here: one to a few planes each) give the one-chunk gradient bit for bit."""
    k, s, p, d, ceil = geometry
    x = _x((3, 3, 9, 8))
    whole = _pool_grad(x, gate, k, s, p, d, ceil)
    monkeypatch.setattr(surrogates, "POOL_CHUNK", 100)
    assert torch.equal(_pool_grad(x, gate, k, s, p, d, ceil), whole)


@pytest.mark.parametrize("gate", GATES[:2], ids=repr)
def test_reused_max_equals_recomputed_max(gate):
    """The backward reuses the forward's max; an in-place change of it (an in-place ReLU) makes it recompute."""
    x = _x((2, 3, 9, 9), seed=4)
    torch.testing.assert_close(
        _pool_grad(x, gate, 3, 2, 1, inplace_relu=True), _pool_grad(x, gate, 3, 2, 1), rtol=1e-12, atol=1e-14
    )


def test_fused_sigmoid_gate_equals_gate_product():
    """ReLU with a float temperature: one softplus_backward pass; a 0-dim tensor temperature: grad * gate(z)."""
    z = _x((4, 5, 6, 6), seed=2) * 30  # also far past the threshold where sigmoid rounds to 1
    grad = _x(z.shape, seed=3)
    grads = []
    for t in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        zr = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(soft_relu(zr, Gate("sigmoid", t)), zr, grad)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(grads[0], grad * torch.sigmoid(z / 0.3), rtol=1e-14, atol=1e-300)
