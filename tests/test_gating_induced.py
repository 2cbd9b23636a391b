"""Gating-induced networks (paper Sec. 2.3, eqs. 4-7) and gate comparisons, in float64 where exactness matters."""

import itertools

import pytest
import torch
from torch import nn

from excitation_pullbacks import pullback
from excitation_pullbacks.gate_overlap import gate_overlap, gate_pearson, path_tensor_pearson, pearson
from excitation_pullbacks.gating_induced import (
    Gating,
    gating_induced,
    induced_forward,
    pack_bits,
    pool_one_hot,
    record_gates,
    soft_gates,
    unpack_bits,
)
from excitation_pullbacks.models.digits import DigitsCNN

DIMS = (6, 5, 4, 3)  # d0, d1, d2, d3; the head maps d3 -> 2 classes


def mlp(seed: int, bias: bool) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(DIMS):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    layers.append(nn.Linear(DIMS[-1], 2, bias=bias))
    return nn.Sequential(*layers).double().eval()


def digits_cnn(seed: int) -> DigitsCNN:
    """A random DigitsCNN with random BN statistics, float64, eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.double().eval()


class BiasFreeCNN(nn.Module):
    """conv-ReLU-maxpool(3, stride 2, padding 1)-conv-ReLU-maxpool(2)-linear, no biases: f(x) = <grad f, x>."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(4, 6, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 3, bias=False),
        )

    def forward(self, x):
        return self.net(x)


def images(n=4, c=3, size=32, seed=1):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_own_gates_give_the_forward_bit_for_bit():
    for dtype in (torch.float32, torch.float64):
        model, x = digits_cnn(0).to(dtype), images().to(dtype)
        gating = record_gates(model, x)
        assert list(gating.relu) == ["features.2#0", "features.6#0", "features.10#0"]
        assert list(gating.pool) == ["features.3#0", "features.7#0", "features.11#0"]
        with torch.no_grad():
            assert torch.equal(induced_forward(model, x, gating), model(x))
            assert torch.equal(gating.output, model(x))


def test_replayed_gates_of_a_checkpoint_reproduce_its_forward(tmp_path):
    """Gates recorded from checkpoint A, written packed and read back, give A's logits when replayed on A,
    and something else when replayed on another parameter state B."""
    a, b, x = digits_cnn(0), digits_cnn(1), images()
    path = tmp_path / "gates.pt"
    record_gates(a, x).save(path)
    gating = Gating.load(path)
    with torch.no_grad():
        assert torch.equal(induced_forward(a, x, gating), a(x))
        mixed = induced_forward(b, x, gating)
        assert torch.equal(mixed, gating_induced(b, x, source=a))
    assert not torch.allclose(mixed, b(x))
    assert all(v.dtype == torch.uint8 for v in (d["bits"] for d in gating.packed()["relu"].values()))


def test_pack_bits_round_trip():
    bits = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-bits.numel() // 8)
    assert torch.equal(unpack_bits(packed, bits.shape), bits)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]


def _augmented_product(model: nn.Sequential, lambdas: list[torch.Tensor]) -> torch.Tensor:
    """y^T Lambda_L W_L ... Lambda_1 W_1 as a (2, d0 + 1) matrix, biases as augmented columns (paper Sec. 2.1)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    m = torch.eye(DIMS[0] + 1, dtype=torch.float64)
    for i, lin in enumerate(linears):
        w = torch.zeros(lin.out_features + 1, lin.in_features + 1, dtype=torch.float64)
        w[:-1, :-1] = lin.weight
        w[:-1, -1] = 0 if lin.bias is None else lin.bias
        w[-1, -1] = 1
        lam = torch.ones(lin.out_features + 1, dtype=torch.float64)
        if i < len(lambdas):
            lam[:-1] = lambdas[i]
        m = torch.diag(lam) @ w @ m
    return m[:-1]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("which", ["own", "other", "soft"])
def test_mlp_matches_the_explicit_product(bias, which):
    """f_Lambda(x) = y^T Lambda_L W_L ... Lambda_1 W_1 x~ (eqs. 4-7) and its gradient = the Lambda-pullback
    (the product without the augmented column), for binary gates of the model itself or of another parameter
    state, and for soft gates sigmoid(z / 0.3)."""
    model, other = mlp(0, bias), mlp(5, bias)
    x = torch.randn(4, DIMS[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if which == "soft":
        gating = soft_gates(model, x, 0.3)
    else:
        gating = record_gates(model if which == "own" else other, x)
    xr = x.clone().requires_grad_(True)
    out = induced_forward(model, xr, gating)
    for i in range(len(x)):
        lambdas = [g[i].double() for g in gating.relu.values()]
        product = _augmented_product(model, lambdas)
        expected = product @ torch.cat([x[i], torch.ones(1, dtype=torch.float64)])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad(out[i, 1], xr, retain_graph=True)
        torch.testing.assert_close(grad[i], product[1, :-1], rtol=0, atol=1e-12)
    if which == "own":
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["own", "other", "soft"])
def test_bias_free_network_is_its_pullback_times_the_input(which):
    """eq. 7 with max-pools: for a bias-free net f_Lambda(x) = <v_Lambda(x), x>, v_Lambda = grad of f_Lambda with
    the gates held fixed."""
    model, x = BiasFreeCNN(0).double().eval(), images(c=2, size=16)
    if which == "soft":
        gating = soft_gates(model, x, 0.3)
    else:
        gating = record_gates(model if which == "own" else BiasFreeCNN(1).double().eval(), x)
    xr = x.clone().requires_grad_(True)
    out = induced_forward(model, xr, gating)
    for c in range(out.shape[1]):
        (v,) = torch.autograd.grad(out[:, c].sum(), xr, retain_graph=True)
        torch.testing.assert_close((v * x).flatten(1).sum(1), out[:, c].detach(), rtol=0, atol=1e-12)


def test_soft_induced_gradient_is_the_excitation_pullback():
    """The gradient of f_Gamma (soft gates of the model's own pre-activations, held fixed) is the excitation
    pullback with detached softmax-pool weights, computed by the independent surrogate backward."""
    model, x = digits_cnn(0), images()
    targets = torch.tensor([1, 4, 7, 9])
    gating = soft_gates(model, x, 0.3, pool_detach=True)
    xr = x.clone().requires_grad_(True)
    out = induced_forward(model, xr, gating)
    (v,) = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), xr)
    expected = pullback(model, x, targets, temperature=0.3, pool_detach=True)
    torch.testing.assert_close(v, expected, rtol=1e-9, atol=1e-12)


def test_soft_pool_gates_tend_to_the_argmax():
    """Softmax-pool weights at a tiny T are the one-hot of the recorded argmax where the window's max is unique,
    and spread over the tied maxima (ReLU zeros) otherwise, the argmax among them (checks the window layout)."""
    model, x = BiasFreeCNN(0).double().eval(), images(c=2, size=16)
    hard, soft = record_gates(model, x), soft_gates(model, x, 1e-9)
    for key, idx in hard.pool.items():
        one_hot = pool_one_hot(idx, hard.pool_args[key], hard.pool_inputs[key]).double()
        w = soft.pool[key]
        unique = w.amax(2, keepdim=True) > 1 - 1e-9
        assert unique.float().mean() > 0.5
        torch.testing.assert_close(torch.where(unique, w, 0), torch.where(unique, one_hot, 0), rtol=0, atol=1e-12)
        assert ((w * one_hot).sum(2) > 0).all()
    for key in hard.relu:
        assert torch.equal(soft.relu[key] > 0.5, hard.relu[key])


def test_overlap_and_pearson_against_direct_counts():
    model, other, x = digits_cnn(0), digits_cnn(1), images()
    a, b = record_gates(model, x), record_gates(other, x)
    same = gate_overlap(a, a)
    assert all(o.agreement == 1.0 and o.iou == 1.0 for o in same.values())
    overlap = gate_overlap(a, b)
    for key, ga in a.relu.items():
        gb = b.relu[key]
        assert overlap[key].agreement == pytest.approx((ga == gb).double().mean().item(), abs=1e-12)
        assert overlap[key].iou == pytest.approx((ga & gb).sum().item() / (ga | gb).sum().item(), abs=1e-12)
    for key, ia in a.pool.items():
        assert overlap[key].agreement == pytest.approx((ia == b.pool[key]).double().mean().item(), abs=1e-12)
    soft = soft_gates(model, x, 0.3)
    for key, m in gate_pearson(soft, a).items():
        if key not in soft.relu:
            continue
        u, w = soft.relu[key], a.relu[key]
        expected = torch.corrcoef(torch.stack([u.flatten().double(), w.flatten().double()]))[0, 1]
        assert pearson(m) == pytest.approx(expected.item(), abs=1e-10)


def test_path_tensor_pearson_matches_the_explicit_tensor():
    """rho(a~(x), b~(x)) from per-layer moments equals Pearson's r over the explicit prod_l d_l paths."""
    model, other = mlp(0, True), mlp(5, True)
    x = torch.randn(5, DIMS[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pairs = [(soft_gates(model, x, 0.3), record_gates(other, x)), (soft_gates(model, x, 0.5), soft_gates(other, x, 1))]
    for a, b in pairs:
        r = path_tensor_pearson(a, b)
        for i in range(len(x)):
            ta, tb = (torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
            for key in a.relu:
                ta = torch.kron(ta, a.relu[key][i].double())
                tb = torch.kron(tb, b.relu[key][i].double())
            expected = torch.corrcoef(torch.stack([ta, tb]))[0, 1]
            if torch.isnan(expected):
                assert torch.isnan(r[i])
            else:
                assert r[i].item() == pytest.approx(expected.item(), abs=1e-10)
