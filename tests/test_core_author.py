"""compat="author": the ReLU paper's published code (module swap, zero-padded soft pool, softmax weights not
detached), float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from excitation_pullbacks import Excitation, Gate, Site, excitation, make_schedule, preset, pullback, soft_max_pool2d

from reference import author_pullback, zero_padded_soft_pool

TARGETS = torch.tensor([3, 917])


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
@pytest.mark.parametrize("detach", [None, True])
def test_author_compat_equals_module_swap(arch, detach, tv_models, images):
    model = tv_models(arch)
    options = {} if detach is None else {"pool_detach": detach}
    ours = pullback(model, images, TARGETS, compat="author", **options)
    ref = author_pullback(model, images, TARGETS, detach=bool(detach))  # the ReLU paper's code: not detached
    assert (_cos(ours, ref) > 1 - 1e-12).all(), _cos(ours, ref)


def test_functional_relu_is_hard_under_author_compat(tv_models, images):
    model = tv_models("densenet121")
    sched = make_schedule(compat="author")
    seen = {}

    def observe(site, z, gate):
        seen[site.key] = gate

    with Excitation(model, sched, observer=observe), torch.no_grad():
        model(images)
    functional = {k: g for k, g in seen.items() if ":" in k}
    assert list(functional) == ["backbone:relu#0"] and functional["backbone:relu#0"].is_hard  # DenseNet.forward
    assert all(not g.is_hard for k, g in seen.items() if ":" not in k)
    # the functional ReLU matters: the author's pullback differs from ours with the same pool
    ours = pullback(model, images, TARGETS, compat="default")
    theirs = pullback(model, images, TARGETS, compat="author")
    assert (_cos(ours, theirs) < 1 - 1e-6).all()
    with excitation(model, compat="author") as report:
        model(images)
    assert report.relu_calls == 121


@pytest.mark.parametrize("detach", [False, True])
def test_zero_padding_pool_gradient(detach):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64) - 1.0  # mostly negative: padding zeros win
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    w = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (zero_padded_soft_pool(xr, pool, 0.3, detach) * w).sum().backward()
    gate = Gate("softmax", 0.3, detach=detach, padding="zero")
    xs = x.clone().requires_grad_(True)
    out = soft_max_pool2d(xs, gate, 3, 2, 1)
    assert torch.equal(out, F.max_pool2d(x, 3, 2, 1))  # forward: the exact max
    (out * w).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    xd = x.clone().requires_grad_(True)
    (soft_max_pool2d(xd, Gate("softmax", 0.3, detach=detach), 3, 2, 1) * w).sum().backward()
    assert not torch.allclose(xd.grad, xs.grad)  # the default excludes the padding: a different gradient


def test_zero_padding_is_default_without_padding():
    """Without padding both modes are one computation (also the fast tiled path)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for k, s in ((2, 2), (3, 1)):
        grads = []
        for padding in ("exclude", "zero"):
            xr = x.clone().requires_grad_(True)
            soft_max_pool2d(xr, Gate("softmax", 0.3, padding=padding), k, s).sum().backward()
            grads.append(xr.grad)
        assert torch.equal(*grads)


def test_compat_options():
    default = make_schedule()
    author = make_schedule(compat="author")
    pool, fpool = Site("features.pool", "maxpool"), Site("<root>:max_pool2d", "maxpool")
    assert default(pool).padding == "exclude" and not default(pool).detach
    assert author(pool).padding == "zero" and not author(pool).detach
    assert make_schedule(compat="author", pool_detach=True)(pool).detach
    assert make_schedule(compat="semantic_author")(pool).detach
    assert author(fpool).is_hard and author(Site("<root>:relu", "relu")).is_hard
    assert not author(Site("features.relu", "relu")).is_hard
    with pytest.raises(ValueError, match="compat"):
        make_schedule(compat="paper")
    with pytest.raises(ValueError, match="padding"):
        Gate("softmax", 0.3, padding="reflect")


class _SemanticNet(nn.Module):
    """Every kind the deep-network paper's code swaps, and functional calls it cannot reach."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.relu(self.conv(x)) - 0.1)  # functional: the module swap leaves it hard
        x = self.silu(self.gelu(self.conv2(self.pool(x))))
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        tokens = F.layer_norm(tokens, (8,))  # functional LayerNorm: left exact
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.head(out.mean(1))


class _Swapped(nn.Module):
    """The paper code's module swap, written here: forward exact, backward the surrogate (straight-through)."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        m, exact = self.m, self.m(x)
        if isinstance(m, nn.ReLU):
            soft = x * (0.5 * (1 + torch.erf(x / (0.6 * 2**0.5)))).detach()
        elif isinstance(m, nn.GELU):
            soft = x * (0.5 * (1 + torch.erf(x / 2**0.5))).detach()
        elif isinstance(m, nn.SiLU):
            soft = x * torch.sigmoid(x / 1.6).detach()
        elif isinstance(m, nn.MaxPool2d):  # unfold over the zero-padded input, detached softmax weights
            n, c = x.shape[:2]
            cols = F.unfold(x, m.kernel_size, padding=m.padding, stride=m.stride).view(n, c, 9, -1)
            soft = (cols * torch.softmax(cols / 0.3, 2).detach()).sum(2).view_as(exact)
        else:  # LayerNorm with detached statistics
            mean, var = x.mean(-1, keepdim=True).detach(), x.var(-1, keepdim=True, unbiased=False).detach()
            soft = (x - mean) * torch.rsqrt(var + m.eps) * m.weight + m.bias
        return exact.detach() + soft - soft.detach()


def test_semantic_author_equals_module_swap():
    torch.manual_seed(0)
    model = _SemanticNet().double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    ours = pullback(model, x, 3, preset("semantic_author"))
    swapped = _SemanticNet().double().eval()
    swapped.load_state_dict(model.state_dict())
    for name in ("relu", "pool", "gelu", "silu", "norm"):
        setattr(swapped, name, _Swapped(getattr(swapped, name)))
    xr = x.clone().requires_grad_(True)
    swapped(xr)[:, 3].sum().backward()
    torch.testing.assert_close(ours, xr.grad, rtol=1e-10, atol=1e-13)
    default = pullback(model, x, 3, preset("semantic"))
    assert not torch.allclose(default, ours)  # the functional calls and the pool padding matter
