"""An independent reference for excitation pullbacks, built the way the paper's listings do it.

Module swap (deep copy, every nn.ReLU / nn.MaxPool2d replaced) plus the strike-through trick
out = hard.detach() + soft - soft.detach(), whose gradient autograd derives from a smooth function:
T * softplus(z / T) (derivative sigmoid(z / T)) for ReLU, and an unfold soft pool for max-pool.
Functional relu calls are reached by substituting torch.nn.functional.relu for the duration.
SiLU / GELU modules are swapped for the same construction with T * softplus(z / T) (derivative sigmoid(z / T))
and T * (u Phi(u) + phi(u)), u = z / T (derivative Phi(z / T)).
"""

import copy
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


def soft_pool_reference(
    x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, temperature=0.3, detach=False
):
    """sum_j x_j softmax(x / T)_j over each max-pool window; padding (and ceil-mode overhang) excluded.

    x: (N, C, H, W) -> (N, C, Ho, Wo) with Ho, Wo as F.max_pool2d gives them.
    """
    k, d, p = _pair(kernel_size), _pair(dilation), _pair(padding)
    s = _pair(stride) if stride else k
    ho, wo = F.max_pool2d(x.detach(), k, s, p, d, ceil_mode=ceil_mode).shape[-2:]
    n, c, h, w = x.shape
    need_h = (ho - 1) * s[0] + (k[0] - 1) * d[0] + 1
    need_w = (wo - 1) * s[1] + (k[1] - 1) * d[1] + 1
    xp = F.pad(x, (p[1], max(0, need_w - w - p[1]), p[0], max(0, need_h - h - p[0])), value=float("-inf"))
    cols = F.unfold(xp, k, dilation=d, stride=s)  # (N, C*kh*kw, L)
    cols = cols.view(n, c, k[0] * k[1], -1)[..., : ho * wo]
    weights = torch.softmax(cols / temperature, dim=2)
    if detach:
        weights = weights.detach()
    vals = torch.where(torch.isinf(cols), torch.zeros_like(cols), cols)
    return (vals * weights).sum(2).view(n, c, ho, wo)


class RefReLU(nn.Module):
    def __init__(self, temperature):
        super().__init__()
        self.t = temperature

    def forward(self, z):
        soft = self.t * F.softplus(z / self.t)
        return torch.clamp_min(z, 0).detach() + soft - soft.detach()


class RefMaxPool(nn.Module):
    def __init__(self, pool: nn.MaxPool2d, temperature):
        super().__init__()
        self.pool, self.t = pool, temperature

    def forward(self, x):
        p = self.pool
        soft = soft_pool_reference(x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode, self.t)
        return self.pool(x).detach() + soft - soft.detach()


def swap(model: nn.Module, relu=None, pool=None) -> nn.Module:
    """A deep copy with nn.ReLU -> relu() and nn.MaxPool2d -> pool(module) (None: keep)."""
    model = copy.deepcopy(model)

    def visit(parent):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU) and relu is not None:
                setattr(parent, name, relu())
            elif isinstance(child, nn.MaxPool2d) and pool is not None:
                setattr(parent, name, pool(child))
            else:
                visit(child)

    visit(model)
    return model


@contextmanager
def functional_relu(fn):
    """Substitute torch.nn.functional.relu (DenseNet's forward calls it) for the block."""
    original = F.relu
    F.relu = fn
    try:
        yield
    finally:
        F.relu = original


def reference_pullback(model, images, targets, temperature=0.3):
    """Excitation pullback (sigmoid gate, softmax pool, both at ``temperature``) by module swap."""
    ref = swap(model, relu=lambda: RefReLU(temperature), pool=lambda m: RefMaxPool(m, temperature))
    x = images.detach().clone().requires_grad_(True)
    with functional_relu(lambda z, inplace=False: RefReLU(temperature)(z)):
        out = ref(x)
    out.gather(1, targets[:, None]).sum().backward()
    return x.grad


# -- the paper author's implementation: module swap, zero-padded unfold soft pool, functional relu hard -----


def zero_padded_soft_pool(x, pool: nn.MaxPool2d, temperature=0.3, detach=False):
    """sum_j x_j softmax(x / T)_j over each window of ``pool``, the zero padding included in the window (what
    F.unfold over the padded input gives, as the author's soft pool computes it). x: (N, C, H, W)."""
    if pool.ceil_mode:
        raise ValueError("the author's unfold pool has no ceil_mode")
    n, c, h, w = x.shape
    k, s = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    p, d = _pair(pool.padding), _pair(pool.dilation)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s).view(n, c, k[0] * k[1], -1)  # zeros where padded
    weights = torch.softmax(cols / temperature, dim=2)
    if detach:
        weights = weights.detach()
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return (cols * weights).sum(2).view(n, c, ho, wo)


class AuthorMaxPool(nn.Module):
    """Forward: the max pool; backward: the zero-padded soft pool's (strike-through)."""

    def __init__(self, pool: nn.MaxPool2d, temperature, detach):
        super().__init__()
        self.pool, self.t, self.detach = pool, temperature, detach

    def forward(self, x):
        soft = zero_padded_soft_pool(x, self.pool, self.t, self.detach)
        return self.pool(x).detach() + soft - soft.detach()


def author_pullback(model, images, targets, temperature=0.3, detach=True):
    """The author's approach: a deep copy with every nn.ReLU and nn.MaxPool2d module swapped (functional
    relu calls, e.g. DenseNet's, left as they are: hard), sigmoid gate and zero-padded soft pool at
    ``temperature``, softmax weights detached with ``detach``."""
    ref = swap(model, relu=lambda: RefReLU(temperature), pool=lambda m: AuthorMaxPool(m, temperature, detach))
    x = images.detach().clone().requires_grad_(True)
    ref(x).gather(1, targets[:, None]).sum().backward()
    return x.grad


# -- SiLU and GELU: the gate s(z / T) in place of the exact derivative ------------------------------------


def _normal_pdf(u):
    return torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)


class RefSiLU(nn.Module):
    """F.silu forward; gradient sigmoid(z / T), derived by autograd from T * softplus(z / T)."""

    def __init__(self, temperature):
        super().__init__()
        self.t = temperature

    def forward(self, z, inplace=False):
        soft = self.t * F.softplus(z / self.t)
        return F.silu(z).detach() + soft - soft.detach()


class RefGELU(nn.Module):
    """F.gelu forward; gradient Phi(z / T), derived by autograd from T * (u Phi(u) + phi(u)), u = z / T;
    for approximate="tanh" the gradient is the tanh form of Phi at z / T, by z * g + (gelu(z) - z * g).detach()
    with g detached."""

    def __init__(self, temperature, approximate="none"):
        super().__init__()
        self.t, self.approximate = temperature, approximate

    def forward(self, z, approximate=None):
        approximate = approximate or self.approximate
        exact = F.gelu(z, approximate=approximate).detach()
        u = z / self.t
        if approximate == "tanh":
            g = (0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))).detach()
            return z * g + (exact - z * g).detach()
        soft = self.t * (u * 0.5 * (1 + torch.erf(u / math.sqrt(2))) + _normal_pdf(u))
        return exact + soft - soft.detach()


def swap_types(model: nn.Module, factories) -> nn.Module:
    """A deep copy with every module of a type in ``factories`` ({type: module -> new module}) replaced."""
    model = copy.deepcopy(model)

    def visit(parent):
        for name, child in parent.named_children():
            new = next((make(child) for kind, make in factories.items() if isinstance(child, kind)), None)
            if new is not None:
                setattr(parent, name, new)
            else:
                visit(child)

    visit(model)
    return model


def reference_smooth_pullback(model, images, targets, temperature=0.3):
    """Excitation pullback of a SiLU/GELU network (own gates at ``temperature``) by module swap."""
    ref = swap_types(
        model,
        {
            nn.SiLU: lambda m: RefSiLU(temperature),
            nn.GELU: lambda m: RefGELU(temperature, m.approximate),
        },
    )
    x = images.detach().clone().requires_grad_(True)
    ref(x).gather(1, targets[:, None]).sum().backward()
    return x.grad
