"""SiLU and GELU sites: exact forward, soft gate s(z / T) in the backward, the native derivative when hard.

Random-weight torchvision EfficientNet-B0 (SiLU) and ConvNeXt-Tiny (GELU) at 32 x 32 in float64, and small
bias-free networks on which the pullback at T = 1 (the networks' own gates, detached) represents f exactly.
"""

import copy
import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from excitation_pullbacks import (
    ByDepth,
    ByName,
    ByType,
    Gate,
    ImageNetInput,
    PerChannel,
    UngatedActivationWarning,
    calibrate,
    excitation,
    make_schedule,
    path_kernel,
    pullback,
)
from excitation_pullbacks.gating import Excitation
from excitation_pullbacks.rules import soft_gelu, soft_silu

from helpers import assert_model_unchanged, model_state
from reference import RefGELU, RefSiLU, reference_smooth_pullback

# Calls per forward pass, counted by forward hooks on the nn.SiLU / nn.GELU modules; neither model's
# forward calls F.silu or F.gelu directly. EfficientNet-B0: stem 1 + MBConv 16 blocks (the first without
# expansion: 2, the others expand + depthwise + squeeze-excitation: 3 each) + head 1 = 49; its 16
# squeeze-excitation nn.Sigmoid scales are not activation gates. ConvNeXt-Tiny: one GELU per CNBlock,
# 3 + 3 + 9 + 3 = 18.
EXPECTED = {"efficientnet_b0": ("silu", nn.SiLU, 49), "convnext_tiny": ("gelu", nn.GELU, 18)}
ARCHS = list(EXPECTED)
TARGETS = torch.tensor([3, 917])


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = ImageNetInput(tvm.get_model(name, weights=None)).double().eval()
            norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            for m in model.modules():
                if hasattr(m, "layer_scale"):  # ConvNeXt starts its residual branches at 1e-6: open them
                    m.layer_scale.data.uniform_(0.5, 1.0)
            # BatchNorm statistics of random images (a random-weight EfficientNet with untouched statistics
            # forgets its input within a few blocks), then random affine parameters
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            with torch.no_grad():
                model(torch.rand(8, 3, 32, 32, dtype=torch.float64) * 2 - 1)
            for m in norms:
                m.eval()
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
            cache[name] = model
        return cache[name]

    return get


@pytest.fixture
def images():
    """Two seeded float64 images in [-1, 1], 32 x 32 (both models downsample by 32)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1


# -- torchvision models ------------------------------------------------------------------------------------


@pytest.mark.slow  # full-size EfficientNet-B0 / ConvNeXt-Tiny
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_bit_identical_and_every_call_gated(arch, models, images):
    model = models(arch)
    kind, module_type, expected = EXPECTED[arch]
    names = {m: n for n, m in model.named_modules()}
    calls = Counter()
    handles = [
        m.register_forward_hook(lambda mod, a, o: calls.update([names[mod]]))
        for m in model.modules()
        if isinstance(m, module_type)
    ]
    try:
        with torch.no_grad():
            plain = model(images)
        assert sum(calls.values()) == expected
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UngatedActivationWarning)  # nn.Sigmoid (SE scale) is not reported
            with excitation(model) as report:
                gated = model(images)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, gated.detach())
    assert getattr(report, f"{kind}_calls") == expected == report.total - report.calls("norm")  # + LayerNorms
    assert getattr(report, kind) == dict(calls)  # every module call, no functional one
    assert report.relu_calls == report.maxpool_calls == 0 and report.ungated == {}
    assert f"{expected} {kind.upper() if kind == 'gelu' else 'SiLU'} at" in str(report)


@pytest.mark.slow  # full-size EfficientNet-B0 / ConvNeXt-Tiny
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_independent_reference(arch, models, images):
    model = models(arch)
    ours = pullback(model, images, TARGETS, temperature=0.3)
    ref = reference_smooth_pullback(model, images, TARGETS, temperature=0.3)
    assert (_cos(ours, ref) >= 0.9999).all(), _cos(ours, ref)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9 * ref.abs().max().item())
    vanilla = pullback(model, images, TARGETS, temperature=0)
    assert (_cos(ours, vanilla) < 0.999).all()  # the gates did change something


@pytest.mark.slow  # full-size EfficientNet-B0 / ConvNeXt-Tiny
@pytest.mark.parametrize("arch", ARCHS)
def test_hard_gate_is_vanilla_gradient(arch, models, images):
    model = models(arch)
    x = images.clone().requires_grad_(True)
    (vanilla,) = torch.autograd.grad(model(x).gather(1, TARGETS[:, None]).sum(), x)
    hard = Gate("hard")
    for kwargs in (
        {"temperature": 0},
        {"schedule": make_schedule(gate="own", temperature=0.0)},
        {"schedule": ByType(hard, hard, Gate("own", 0.0), Gate("normal_cdf", 0.0))},
    ):
        assert torch.equal(pullback(model, images, TARGETS, **kwargs), vanilla), kwargs


@pytest.mark.slow  # full-size EfficientNet-B0 / ConvNeXt-Tiny
@pytest.mark.parametrize("arch", ARCHS)
def test_model_restored_also_after_exception(arch, models, images):
    model = models(arch)
    before = model_state(model)
    pullback(model, images, TARGETS)
    assert_model_unchanged(model, before)

    class Boom(RuntimeError):
        pass

    site = next(m for m in model.modules() if isinstance(m, EXPECTED[arch][1]))
    handle = site.register_forward_hook(lambda *a: (_ for _ in ()).throw(Boom()))
    try:
        with pytest.raises(Boom):
            pullback(model, images, TARGETS)
    finally:
        handle.remove()
    with pytest.raises(Boom), excitation(model):
        model(images)
        raise Boom
    assert_model_unchanged(model, before)


@pytest.mark.slow  # full-size EfficientNet-B0 / ConvNeXt-Tiny
@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_per_channel_schedule(arch, models, images):
    model = models(arch)
    _, _, expected = EXPECTED[arch]
    sched = calibrate(model, [images])
    assert len(sched.temperatures) == expected
    if arch == "convnext_tiny":  # GELU acts on the (N, H, W, 4C) output of a Linear: channels are last
        block = model.backbone.features[1][0].block
        z = []
        handle = block[3].register_forward_hook(lambda m, a, o: z.append(o))
        with torch.no_grad():
            model(images)
        handle.remove()
        temps = sched.temperatures["backbone.features.1.0.block.4#0"]
        assert temps.shape == (384,)
        torch.testing.assert_close(temps, 0.3 * z[0].flatten(0, 2).std(0, correction=0).float())
    else:
        assert sched.temperatures["backbone.features.0.2#0"].shape == (32,)
    ours = pullback(model, images, TARGETS, schedule=sched)
    assert torch.isfinite(ours).all()
    # a per-channel schedule with T = 0.3 everywhere is the global one
    flat = PerChannel({k: torch.full(v.shape, 0.3, dtype=torch.float64) for k, v in sched.temperatures.items()})
    torch.testing.assert_close(
        pullback(model, images, TARGETS, schedule=flat),
        pullback(model, images, TARGETS, temperature=0.3),
        rtol=1e-9,
        atol=0,
    )


# -- every call form on a small network ------------------------------------------------------------------


class SmoothForms(nn.Module):
    """Every SiLU / GELU call form: modules (one reused, in place), F.silu (also in place), F.gelu in both
    approximate forms; ``mixed`` adds a ReLU and a max-pool. Bias-free when ``bias`` is False."""

    def __init__(self, bias=False, mixed=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv2d(5, 4, 3, bias=bias)
        self.act = nn.SiLU(inplace=True)  # used twice
        self.gelu = nn.GELU()
        self.gelu_tanh = nn.GELU(approximate="tanh")
        self.head = nn.Linear(4, 3, bias=bias)
        self.mixed = mixed

    def forward(self, x):
        h = self.act(self.conv1(x))  # nn.SiLU, in place
        h = self.gelu(h * 1.5)  # nn.GELU
        h = F.silu(self.conv2(h), inplace=True)  # F.silu(inplace=True)
        h = self.gelu_tanh(h)  # nn.GELU("tanh")
        if self.mixed:
            h = F.max_pool2d(F.relu(h), 2)
        h = F.gelu(self.conv3(h), approximate="tanh")  # F.gelu(approximate="tanh")
        h = F.silu(F.gelu(h))  # F.gelu, F.silu
        return self.head(self.act(h).mean((2, 3)))  # nn.SiLU again


def _forms(bias=False, mixed=False):
    torch.manual_seed(0)
    return SmoothForms(bias, mixed).double().eval()


def _x(n=2, size=8, seed=4):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _forms_reference(model, x, targets, t):
    """SmoothForms written with the reference ops."""
    silu, gelu, gelu_tanh = RefSiLU(t), RefGELU(t), RefGELU(t, "tanh")
    m = model
    x = x.clone().requires_grad_(True)
    h = silu(m.conv1(x))
    h = gelu(h * 1.5)
    h = silu(m.conv2(h))
    h = gelu_tanh(h)
    h = gelu_tanh(m.conv3(h))
    h = silu(gelu(h))
    m.head(silu(h).mean((2, 3))).gather(1, targets[:, None]).sum().backward()
    return x.grad


def test_every_call_form_is_gated_exactly():
    model, x, t = _forms(bias=True), _x(), torch.tensor([0, 2])
    with torch.no_grad():
        plain = model(x)
    with excitation(model) as report:
        assert torch.equal(model(x), plain)
    assert report.silu == {"act": 2, "<root>:silu": 2} and report.gelu == {"gelu": 1, "gelu_tanh": 1, "<root>:gelu": 2}
    assert report.total == 8
    for temp in (0.3, 1.0, 2.5):
        ours = pullback(model, x, t, temperature=temp)
        torch.testing.assert_close(ours, _forms_reference(model, x, t, temp), rtol=1e-10, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (vanilla,) = torch.autograd.grad(model(xr).gather(1, t[:, None]).sum(), xr)
    assert torch.equal(pullback(model, x, t, temperature=0), vanilla)


@pytest.mark.parametrize("mixed", [False, True])
def test_own_gates_at_unit_temperature_represent_the_function(mixed):
    """f(x) = <pullback(x), x> for a bias-free network when every gate is the network's own, detached:
    SiLU z * sigmoid(z), GELU z * Phi(z) (tanh form for approximate="tanh"), ReLU 1[z>0], the max."""
    model, x = _forms(mixed=mixed), _x(3)
    f = model(x)
    for c in range(3):
        v = pullback(model, x, c, gate="own", temperature=1.0)
        torch.testing.assert_close((v * x).flatten(1).sum(1), f[:, c], rtol=1e-12, atol=1e-12)
    if not mixed:  # default gate shape at SiLU/GELU sites is their own: temperature=1 is enough
        v = pullback(model, x, 1, temperature=1.0)
        torch.testing.assert_close((v * x).flatten(1).sum(1), f[:, 1], rtol=1e-12, atol=1e-12)
        vanilla = pullback(model, x, 1, temperature=0)
        assert not torch.allclose((vanilla * x).flatten(1).sum(1), f[:, 1])  # the exact gradient does not


DIMS = (5, 4, 3, 4)


def _mlp():
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Linear(5, 4, bias=False),
            nn.SiLU(),
            nn.Linear(4, 3, bias=False),
            nn.GELU(),
            nn.Linear(3, 4, bias=False),
            nn.GELU(approximate="tanh"),
            nn.Linear(4, 2, bias=False),
        )
        .double()
        .eval()
    )


def _gates(z, t, kind):
    """The gate values computed here from their formulas; channels with T = 0 get the exact derivative."""
    u = z / t
    if kind == "silu":
        g, s = torch.sigmoid(u), torch.sigmoid(z)
        exact = s * (1 + z * (1 - s))
    elif kind == "gelu":
        g = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
        exact = 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    else:
        k = math.sqrt(2 / math.pi)
        g = 0.5 * (1 + torch.tanh(k * (u + 0.044715 * u**3)))
        th = torch.tanh(k * (z + 0.044715 * z**3))
        exact = 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * k * (1 + 3 * 0.044715 * z * z)
    return torch.where(torch.as_tensor(t) == 0, exact, g)


@pytest.mark.parametrize(
    "temps",
    [
        (0.5, 0.5, 0.5),
        (torch.tensor([0.1, 0.5, 1.0, 2.0]), torch.tensor([0.3, 1.0, 3.0]), torch.tensor([1.0, 0.0, 0.2, 0.0])),
    ],
    ids=["global", "per-channel"],
)
def test_pullback_is_explicit_matrix_product(temps):
    """v^T = y^T Lambda_3 W_3 Lambda_2 W_2 Lambda_1 W_1 with Lambda_l = s_l(z_l / T_l) (per channel), the
    exact derivative on channels with T = 0."""
    model, x = _mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sched = ByName({name: Gate("own", t) for name, t in zip(("1", "3", "5"), temps)}, default=ByType(Gate("hard")))
    got = pullback(model, x, 1, schedule=sched)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    kinds = ("silu", "gelu", "gelu_tanh")
    for i in range(x.shape[0]):
        zs, h = [], x[i]
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.Linear) and layer is not linears[-1]:
                zs.append(h.clone())
        row = linears[-1].weight[1]
        for lin, z, t, kind in reversed(list(zip(linears[:-1], zs, temps, kinds))):
            row = (row * _gates(z, t, kind)) @ lin.weight
        torch.testing.assert_close(got[i], row, rtol=1e-12, atol=1e-12)


def test_channels_last_sites_take_per_channel_temperatures_on_the_last_dim():
    """A Linear on (N, H, W, C) followed by GELU (ConvNeXt's block): calibration and per-channel gates use
    the last dim."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
            self.act = nn.GELU()

        def forward(self, x):
            h = self.conv(x).permute(0, 2, 3, 1)
            return self.fc2(self.act(self.fc1(h))).mean((1, 2))

    torch.manual_seed(0)
    model, x = Block().double().eval(), _x(size=6)
    sched = calibrate(model, [x], scale=0.5)
    z = model.fc1(model.conv(x).permute(0, 2, 3, 1))
    torch.testing.assert_close(sched.temperatures["act#0"], 0.5 * z.flatten(0, 2).std(0, correction=0).float())
    t = sched.temperatures["act#0"].double()
    xr = x.clone().requires_grad_(True)
    model.fc2(RefGELU(t)(model.fc1(model.conv(xr).permute(0, 2, 3, 1)))).mean((1, 2))[:, 2].sum().backward()
    torch.testing.assert_close(pullback(model, x, 2, schedule=sched), xr.grad, rtol=1e-10, atol=1e-12)


def test_schedules_pick_smooth_sites():
    model, x = _forms(), _x()
    seen = []
    sched = ByDepth(
        {0: Gate("hard"), 1: Gate("sigmoid", 0.7)}, kind="gelu", default=make_schedule(smooth_temperature=1.0)
    )
    with Excitation(model, sched, observer=lambda s, z, g: seen.append((s.key, s.kind, s.depth, s.approximate, g))):
        model(x)
    gates = {key: (kind, depth, approx, g.shape, float(g.temperature)) for key, kind, depth, approx, g in seen}
    assert gates["gelu#0"][:4] == ("gelu", 0, "none", "hard")
    assert gates["gelu_tanh#0"] == ("gelu", 1, "tanh", "sigmoid", 0.7)
    assert gates["<root>:gelu#0"] == ("gelu", 2, "tanh", "normal_cdf_tanh", 1.0)  # own gate, resolved
    assert gates["<root>:gelu#1"] == ("gelu", 3, "none", "normal_cdf", 1.0)
    assert gates["act#1"] == ("silu", 3, "none", "sigmoid", 1.0)
    only_silu = ByName({"*": Gate("hard")}, kind="silu", default=make_schedule(smooth_temperature=0.4))
    t = torch.tensor([0, 1])
    ours = pullback(model, x, t, schedule=only_silu)
    assert not torch.equal(ours, pullback(model, x, t, temperature=0))
    assert not torch.allclose(ours, pullback(model, x, t, temperature=0.4))


def test_surrogates_direct():
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        zz = z.detach().to(dtype)
        assert torch.equal(soft_silu(zz, Gate("own", 0.3)), F.silu(zz))
        for approx in ("none", "tanh"):
            assert torch.equal(soft_gelu(zz, Gate("own", 0.3), approx), F.gelu(zz, approximate=approx))
    t = torch.tensor([0.2, 0.0, 1.0, 3.0], dtype=torch.float64)
    for gate in (Gate("own", 0.3), Gate("normal_cdf", 0.6), Gate("softsign", 0.2), Gate("own", t)):
        (ours,) = torch.autograd.grad(soft_silu(z, gate), z, g)
        tt = gate.temperature.view(1, -1, 1) if isinstance(gate.temperature, torch.Tensor) else gate.temperature
        expected = g * (_gates(z, tt, "silu") if gate.shape == "own" else gate(z))
        torch.testing.assert_close(ours, expected.detach(), rtol=1e-12, atol=1e-14)
    for approx, kind in (("none", "gelu"), ("tanh", "gelu_tanh")):
        (ours,) = torch.autograd.grad(soft_gelu(z, Gate("own", t), approx), z, g)
        torch.testing.assert_close(ours, (g * _gates(z, t.view(1, -1, 1), kind)).detach(), rtol=1e-12, atol=1e-14)
        (none,) = torch.autograd.grad(soft_gelu(z, Gate("none"), approx), z, g)
        assert torch.equal(none, g)
        (native,) = torch.autograd.grad(F.gelu(z, approximate=approx), z, g)
        assert torch.equal(torch.autograd.grad(soft_gelu(z, Gate("own", 0.0), approx), z, g)[0], native)


def test_path_kernel_with_own_smooth_gates():
    """K(x, x') = <x, x'> prod_l <s_l(z_l(x)), s_l(z_l(x'))> with the networks' own gates."""
    model, x = _mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k = path_kernel(model, x, gate="own", temperature=1.0)
    expected = x @ x.T
    h = x
    kinds = iter(("silu", "gelu", "gelu_tanh"))
    for layer in list(model)[:-1]:
        if isinstance(layer, nn.Linear):
            z = layer(h)
            lam = _gates(z, 1.0, next(kinds))
            expected = expected * (lam @ lam.T)
        h = layer(h)
    torch.testing.assert_close(k, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a gating"):
        path_kernel(model, x, gate="hard")


def test_warnings_only_for_ungated_activations():
    x = torch.rand(1, 3, 10, 10)
    for act in (nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.Sigmoid()):
        model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.SiLU(), act, nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UngatedActivationWarning)
            pullback(model, x, 0)  # a model whose only gated sites are SiLU/GELU is accepted
    for act, name in ((nn.Hardswish(), "Hardswish"), (nn.Mish(), "Mish"), (nn.ELU(), "ELU")):
        model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.GELU(), act, nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
        with pytest.warns(UngatedActivationWarning, match=name):
            pullback(model, x, 0)
    with pytest.raises(ValueError, match="no call that a rule covers"):
        pullback(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(128, 3)), x, 0)


def test_deep_copy_is_unaffected():
    """The reference's deep copies and other instances stay native inside the context."""
    model, x = _forms(), _x()
    other = copy.deepcopy(model)
    with excitation(model) as report:
        model(x)
        other(x)
    assert report.silu_calls == 4 and report.forwards == 1
