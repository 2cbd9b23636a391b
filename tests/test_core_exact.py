"""Exact identities of the paper on a small MLP in float64 (eqs. 5-8 and 23)."""

import itertools

import pytest
import torch
from torch import nn

from excitation_pullbacks import ByDepth, Gate, PerChannel, path_kernel, pullback

DIMS = (5, 4, 3, 4)  # d0, d1, d2, d3; the head maps d3 -> 2 classes


def mlp(bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(DIMS):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    layers.append(nn.Linear(DIMS[-1], 2, bias=bias))
    return nn.Sequential(*layers).double().eval()


def inputs(n=3):
    return torch.randn(n, DIMS[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def pre_activations(model, x):
    """z_1..z_L for one input x (d0,), by walking the layers."""
    zs, h = [], x
    for layer in model:
        h = layer(h)
        if isinstance(layer, nn.Linear) and layer is not model[-1]:
            zs.append(h.clone())
    return zs


GATES = [
    Gate("sigmoid", 0.3),
    Gate("normal_cdf", 0.6),
    Gate("softsign", 0.2),
    Gate("hard", 0.0),
    Gate("none", 1.0),
    Gate("sigmoid", torch.tensor([0.1, 0.5, 1.0, 2.0])),
]


@pytest.mark.parametrize("gate", GATES, ids=repr)
def test_pullback_is_explicit_matrix_product(gate):
    """v_Lambda^T = y^T Lambda_L W_L ... Lambda_1 W_1 (eqs. 5-6) for a gating Lambda = sigma(z)."""
    model = mlp(bias=False)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    x = inputs()
    per_layer = isinstance(gate.temperature, torch.Tensor)  # per-channel T only fits the width-4 layers
    rules = [gate if (not per_layer or lin.out_features == 4) else Gate("sigmoid", 0.3) for lin in linears[:-1]]
    got = pullback(model, x, 1, schedule=ByDepth(rules))
    for i in range(x.shape[0]):
        row = linears[-1].weight[1]  # y^T
        zs = pre_activations(model, x[i])
        for lin, z, rule in reversed(list(zip(linears[:-1], zs, rules))):
            row = (row * rule(z[None])[0]) @ lin.weight
        torch.testing.assert_close(got[i], row, rtol=1e-12, atol=1e-12)


def test_hard_gate_represents_the_function():
    """f(x) = <grad f(x), x> for a bias-free ReLU network (eqs. 7-8)."""
    model = mlp(bias=False)
    x = inputs(5)
    grad = pullback(model, x, 0, temperature=0)
    torch.testing.assert_close((grad * x).sum(1), model(x)[:, 0], rtol=1e-12, atol=1e-12)


def explicit_features(model, x, gate, bias):
    """phi_Lambda(x) = lambda_L (x) ... (x) lambda_1 (x) x as an explicit path-space vector (eq. 17)."""
    gates = [gate(z) for z in pre_activations(model, x)]
    if bias:
        gates = [torch.cat([g, g.new_ones(1)]) for g in gates]
        x = torch.cat([x, x.new_ones(1)])
    phi = x
    for g in gates:
        phi = torch.outer(g, phi).flatten()
    return phi


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gate", [Gate("sigmoid", 0.3), Gate("hard", 0.0)], ids=repr)
def test_path_kernel_is_path_space_dot_product(gate, bias):
    """K_Lambda(x, x') = <x, x'> prod_l <lambda_l(x), lambda_l(x')> = <phi(x), phi(x')> (eq. 23)."""
    model = mlp(bias=bias)
    x = inputs(4)
    k = path_kernel(model, x, gate=gate.shape, temperature=gate.temperature, bias=bias)
    phis = torch.stack([explicit_features(model, xi, gate, bias) for xi in x])
    assert phis.shape[1] == (DIMS[0] + bias) * (DIMS[1] + bias) * (DIMS[2] + bias) * (DIMS[3] + bias)
    torch.testing.assert_close(k, phis @ phis.T, rtol=1e-12, atol=1e-12)
    kn = path_kernel(model, x, gate=gate.shape, temperature=gate.temperature, bias=bias, normalize=True)
    norms = phis.norm(dim=1)
    torch.testing.assert_close(kn, (phis @ phis.T) / torch.outer(norms, norms), rtol=1e-10, atol=1e-12)


def test_path_space_represents_the_gated_function():
    """f_Lambda(x) = <v_Lambda(x), x> = <phi_Lambda(x), omega> (eqs. 7, 18-19), omega from the weights."""
    model = mlp(bias=False)
    x = inputs(2)
    gate = Gate("sigmoid", 0.3)
    v = pullback(model, x, 1, schedule=ByDepth([gate] * 3))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    # omega_p = y[p_L] prod_l W_l[p_l, p_{l-1}], enumerated over all paths p = (p_0, ..., p_L).
    ranges = [range(d) for d in DIMS]
    for i in range(x.shape[0]):
        gates = [gate(z) for z in pre_activations(model, x[i])]
        total = 0.0
        for p in itertools.product(*ranges):
            w = linears[-1].weight[1, p[-1]]
            act = x[i, p[0]]
            for l in range(1, len(DIMS)):
                w = w * linears[l - 1].weight[p[l], p[l - 1]]
                act = act * gates[l - 1][p[l]]
            total = total + w * act
        torch.testing.assert_close((v[i] * x[i]).sum(), total, rtol=1e-10, atol=1e-12)


def test_per_channel_schedule_with_equal_temperatures_is_global():
    model = mlp(bias=True)
    x = inputs()
    keys = ["1#0", "3#0", "5#0"]  # the nn.ReLU modules of the Sequential
    sched = PerChannel({k: torch.full((w,), 0.3) for k, w in zip(keys, DIMS[1:])})
    torch.testing.assert_close(pullback(model, x, 1, schedule=sched), pullback(model, x, 1, temperature=0.3))
