"""The max-pool rule: forward F.max_pool2d bit for bit, backward the gradient of a softmax pool.

``soft_max_pool2d(x, ...)``: the backward is the gradient of s = sum_j x_j w_j, w = softmax(x / T) over each
window (padding excluded, as in the max, or taken as zeros with ``Gate.padding="zero"``), i.e.
ds/dx_j = w_j (1 + (x_j - s) / T), or w_j alone with detached weights.

The torch path loops over the k_h * k_w window offsets, each an output-sized slice of one stride phase of the
input, so it never materialises the k_h * k_w-fold unfolded input that an unfold-based soft pool needs;
windows that tile the input (stride == kernel) take a direct path. On CPU the compiled kernel op
(:mod:`~excitation_pullbacks.rules.pool_kernel`) computes the same values in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..gates import Gate
from ..tracing import tracing
from . import pool_kernel
from .base import Call, Rule

__all__ = [
    "MaxPool2d",
    "PoolArgs",
    "pool_geometry",
    "soft_max_pool2d",
    "soft_pool_backward",
    "torch_pool_backward",
]


@dataclass(frozen=True)
class PoolArgs:
    """The geometry of one max-pool call (as ``F.max_pool2d`` takes it), handed to a substitute."""

    kernel_size: object
    stride: object = None
    padding: object = 0
    dilation: object = 1
    ceil_mode: bool = False


def _pair(v) -> tuple:
    """An int or a pair -> a 2-tuple (as torch's pooling modules read their size arguments)."""
    return tuple(v) if isinstance(v, Iterable) else (v, v)


def pool_geometry(kernel_size, stride, padding, dilation):
    """Normalise max-pool arguments to 2-tuples (stride defaults to kernel_size, as in F.max_pool2d)."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride is not None and (not isinstance(stride, (list, tuple)) or len(stride)) else k
    return k, s, _pair(padding), _pair(dilation)


def _phases(xp: Tensor, k, s, d, out_hw):
    """Split the padded input (N, C, Hp, Wp) into its stride phases, each made contiguous once, and list
    every window offset as (phase key, row slice, column slice) of output size (Ho, Wo) in its phase.

    Strided views of the input are several times slower to read than contiguous rows; reading each input
    element once into its phase keeps the per-offset work on contiguous memory.
    """
    ho, wo = out_hw
    phases: dict = {}
    offsets = []
    for i in range(k[0]):
        for j in range(k[1]):
            (qi, ri), (qj, rj) = divmod(i * d[0], s[0]), divmod(j * d[1], s[1])
            if (ri, rj) not in phases:
                phases[(ri, rj)] = xp[:, :, ri :: s[0], rj :: s[1]].contiguous()
            offsets.append(((ri, rj), slice(qi, qi + ho), slice(qj, qj + wo)))
    return phases, offsets


#: Input elements per plane chunk of the overlapping-window pool backward: bounds the memory of the
#: per-offset terms it keeps (about 2.5x the chunk for a 3x3 / stride-2 pool).
POOL_CHUNK = 1 << 22


def soft_pool_backward(x: Tensor, out: Tensor, grad: Tensor, gate: Gate, k, s, p, d) -> Tensor:
    """Input gradient of the softmax pool.

    x: (N, C, H, W) pool input; out: (N, C, Ho, Wo) its exact max pool (the per-window shift m that keeps
    the exponentials finite); grad: (N, C, Ho, Wo). Returns (N, C, H, W).
    With r_j = (x_j - m) / T, e_j = exp(r_j), Z = sum e_j: w_j = e_j / Z and
    ds/dx_j = w_j (r_j + a) with a = 1 - sum_j(e_j r_j) / Z. With ``gate.padding == "zero"`` the explicit
    padding enters the sums as x_j = 0 (and m is the window max including those zeros).

    On CPU in float32/float64 this runs the compiled kernel op of :mod:`~excitation_pullbacks.rules.pool_kernel`
    where it is available, else :func:`torch_pool_backward`.
    """
    if not gate.is_none:
        fast = pool_kernel.pool_backward(
            x, grad, gate.temperature, k, s, p, d, zero=gate.padding == "zero", detach=gate.detach
        )
        if fast is not None:
            return fast
    return torch_pool_backward(x, out, grad, gate, k, s, p, d)


def torch_pool_backward(x: Tensor, out: Tensor, grad: Tensor, gate: Gate, k, s, p, d) -> Tensor:
    """soft_pool_backward in torch ops (any device and dtype; same arguments and result).

    Every (n, c) plane is independent: overlapping windows are processed in chunks of about ``POOL_CHUNK``
    input elements, which bounds the memory of the per-offset terms kept between the two passes.
    """
    n, c, h, w = x.shape
    planes = max(1, POOL_CHUNK // max(1, h * w))
    if n * c <= planes or (s == k and d == (1, 1) and not any(p)):  # tiling windows keep no per-offset terms
        return _pool_backward_chunk(x, out, grad, gate, k, s, p, d)
    result = torch.empty_like(x, memory_format=torch.contiguous_format)
    if isinstance(gate.temperature, Tensor) and gate.temperature.numel() > 1:  # per channel: chunk the batch
        step = max(1, planes // c)
        for i in range(0, n, step):
            j = slice(i, i + step)
            result[j] = _pool_backward_chunk(x[j], out[j], grad[j], gate, k, s, p, d)
        return result
    flat = (1, n * c)
    xf, of, gf = x.reshape(*flat, h, w), out.reshape(*flat, *out.shape[-2:]), grad.reshape(*flat, *out.shape[-2:])
    rf = result.view(*flat, h, w)
    for i in range(0, n * c, planes):
        j = slice(i, i + planes)
        rf[:, j] = _pool_backward_chunk(xf[:, j], of[:, j], gf[:, j], gate, k, s, p, d)
    return result


def _pool_backward_chunk(x: Tensor, out: Tensor, grad: Tensor, gate: Gate, k, s, p, d) -> Tensor:
    """soft_pool_backward on one chunk of planes (same arguments and result)."""
    h, w = x.shape[-2:]
    ho, wo = out.shape[-2:]
    extra_h = max(0, (ho - 1) * s[0] + (k[0] - 1) * d[0] + 1 - h - p[0])  # ceil_mode windows past the edge
    extra_w = max(0, (wo - 1) * s[1] + (k[1] - 1) * d[1] + 1 - w - p[1])
    padded = any(p) or extra_h or extra_w
    zeros = gate.padding == "zero" and any(p)
    uniform = gate.is_none
    t = 1.0 if uniform else gate.temperature_like(x)
    if padded:
        # Excluded positions get a value whose weight exp((fill - m) / T) is exactly 0.
        zh, zw = (min(extra_h, p[0]), min(extra_w, p[1])) if zeros else (0, 0)
        inner, outer = (p[1], zw, p[0], zh), (0, extra_w - zw, 0, extra_h - zh)
        if zeros:  # the explicit padding as zeros, only ceil-mode overhang past it excluded
            x0 = F.pad(x, inner, value=0.0)
        else:
            x0, outer = x, (p[1], extra_w, p[0], extra_h)
        if tracing():  # the same values without reading a number back (no graph break)
            t_max = t.amax() if isinstance(t, Tensor) else t
            fill = x0.detach().amin() - 1000.0 * t_max
            keep = F.pad(torch.ones((1, 1, *x0.shape[-2:]), dtype=torch.bool, device=x.device), outer, value=False)
            xp = torch.where(keep, F.pad(x0, outer), fill.to(x.dtype))
        else:
            t_max = float(t.max()) if isinstance(t, Tensor) else t
            fill = float(x0.detach().amin()) - 1000.0 * t_max if x.numel() else 0.0
            xp = F.pad(x0, outer, value=fill)
        if zeros:
            out = F.max_pool2d(xp, k, s, 0, d)[:, :, :ho, :wo]
    else:
        xp = x
    if not padded and not uniform and s == k and d == (1, 1):  # no padding: the same path for either mode
        return _tiled_pool_backward(x, out, grad, gate.detach, t, k)
    phases, offsets = _phases(xp, k, s, d, (ho, wo))
    grads = {key: torch.zeros_like(ph) for key, ph in phases.items()}
    if uniform:
        valid = torch.ones((1, 1, h, w), dtype=x.dtype, device=x.device)
        if zeros:  # padded zeros count in the mean
            valid = F.pad(F.pad(valid, (p[1], zw, p[0], zh), value=1.0), (0, extra_w - zw, 0, extra_h - zh))
        elif padded:
            valid = F.pad(valid, (p[1], extra_w, p[0], extra_h))
        vphases, _ = _phases(valid, k, s, d, (ho, wo))
        count = sum(vphases[key][:, :, a, b] for key, a, b in offsets)
        coef = grad / count
        for key, a, b in offsets:
            grads[key][:, :, a, b] += coef * vphases[key][:, :, a, b]
    else:
        if isinstance(t, Tensor):

            def exponent(v):  # r = (v - m) / T
                return torch.sub(v, out).div_(t)
        else:
            neg_m = out / -t

            def exponent(v):  # r = v / T - m / T in one pass
                return torch.add(neg_m, v, alpha=1.0 / t)

        z = torch.zeros_like(out)
        er = None if gate.detach else torch.zeros_like(out)
        terms = []  # (r, e) per window offset: one exponential each, kept while the chunk is in cache
        for key, a, b in offsets:
            r = exponent(phases[key][:, :, a, b])
            e = torch.exp(r)
            z += e
            if er is not None:
                er.addcmul_(e, r)
            terms.append((r, e))
        coef = grad / z
        if er is not None:
            shift = er.div_(z).neg_().add_(1)  # a = 1 - sum(e r) / Z
        for (key, a, b), (r, e) in zip(offsets, terms):
            e.mul_(coef)
            if er is not None:
                e.mul_(r.add_(shift))
            grads[key][:, :, a, b] += e
    gp = torch.empty_like(xp) if len(grads) == s[0] * s[1] else torch.zeros_like(xp)
    for (ri, rj), g in grads.items():
        gp[:, :, ri :: s[0], rj :: s[1]] = g
    return gp[:, :, p[0] : p[0] + h, p[1] : p[1] + w] if padded else gp


def _tiled_pool_backward(x: Tensor, out: Tensor, grad: Tensor, detach: bool, t, k) -> Tensor:
    """soft_pool_backward for windows that tile the input (stride == kernel, no dilation or padding, e.g.
    VGG's 2x2 pools): every element lies in one window at most, so window sums are sum pools of
    element-wise terms. Window-level factors broadcast over a (N, C, Ho, kh, Wo, kw) view."""
    n, c, h, w = x.shape
    ho, wo = out.shape[-2:]
    hh, ww = ho * k[0], wo * k[1]

    def tiles(v: Tensor) -> Tensor:
        return v.view(n, c, ho, k[0], wo, k[1])

    def window_sum(v: Tensor) -> Tensor:
        return F.avg_pool2d(v, k, k, divisor_override=1)

    r = torch.sub(x[:, :, :hh, :ww], F.interpolate(out, size=(hh, ww), mode="nearest")).div_(t)  # (x - m) / T
    e = torch.exp(r)
    z = window_sum(e)
    coef = grad / z
    if detach:
        g = tiles(e).mul_(coef[:, :, :, None, :, None])
    else:  # e (r + a) coef = (e r + a e) coef with a = 1 - sum(e r) / Z, in place
        q = r.mul_(e)
        a = window_sum(q).div_(z).neg_().add_(1)
        g = tiles(q).addcmul_(tiles(e), a[:, :, :, None, :, None]).mul_(coef[:, :, :, None, :, None])
    g = g.reshape(n, c, hh, ww)
    return F.pad(g, (0, w - ww, 0, h - hh)) if (hh, ww) != (h, w) else g


class _SoftMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gate: Gate, k, s, p, d, ceil_mode: bool, return_indices: bool):
        if return_indices:
            out, idx = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
            ctx.mark_non_differentiable(idx)
        else:
            out = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode)
        ctx.save_for_backward(x)
        # The max is reused in the backward unless the caller modifies it in place (e.g. an in-place ReLU):
        # a detached alias shares the output's version counter (saving it would make that an error).
        ctx.out = None if torch.compiler.is_compiling() else out.detach()
        ctx.out_version = None if ctx.out is None else ctx.out._version
        ctx.geometry = (gate, k, s, p, d, ceil_mode)
        return (out, idx) if return_indices else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, *unused):
        (x,) = ctx.saved_tensors
        gate, k, s, p, d, ceil_mode = ctx.geometry
        out = ctx.out
        if out is None or out._version != ctx.out_version:
            out = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode)
        ctx.out = None
        squeeze = x.dim() == 3
        if squeeze:
            x, grad, out = x.unsqueeze(0), grad.unsqueeze(0), out.unsqueeze(0)
        g = soft_pool_backward(x, out, grad, gate, k, s, p, d)
        return (g.squeeze(0) if squeeze else g), None, None, None, None, None, None, None


def soft_max_pool2d(
    x: Tensor,
    gate: Gate,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """F.max_pool2d forward with the softmax-pool backward of ``gate``.

    x: (N, C, H, W) or (C, H, W). Returns what F.max_pool2d returns for the same arguments.
    """
    k, s, p, d = pool_geometry(kernel_size, stride, padding, dilation)
    if gate.is_hard:
        return F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=return_indices)
    if not gate.is_none and not isinstance(gate.temperature, Tensor) and gate.temperature == math.inf:
        gate = Gate("none", math.inf, padding=gate.padding)
    return _SoftMaxPool2d.apply(x, gate, k, s, p, d, bool(ceil_mode), bool(return_indices))


def _pool_stub(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    pass  # F.max_pool2d (a dispatcher) and torch.max_pool2d (a builtin without return_indices)


class MaxPool2d(Rule):
    """Max-pool calls: ``nn.MaxPool2d``, ``F.max_pool2d``, ``F.max_pool2d_with_indices``, ``torch.max_pool2d``."""

    kind = "maxpool"
    name = "max_pool2d"
    modules = (nn.MaxPool2d,)
    functions: ClassVar[dict] = {
        F.max_pool2d: _pool_stub,
        F.max_pool2d_with_indices: None,
        torch.max_pool2d: _pool_stub,
    }

    def prepare(self) -> None:
        pool_kernel.available()  # builds or loads the kernel library now: no file access inside a graph

    def geometry(self, call: Call) -> PoolArgs:
        return PoolArgs(call["kernel_size"], call["stride"], call["padding"], call["dilation"], bool(call["ceil_mode"]))

    def returns_indices(self, call: Call) -> bool:
        return call.func is F.max_pool2d_with_indices or bool(call.get("return_indices", False))

    def check_substitute(self, call: Call, site) -> None:
        if self.returns_indices(call):
            raise ValueError(f"a substituted max-pool call cannot return indices ({site.key})")

    def apply(self, call, site, gate, canonizers):
        g = self.geometry(call)
        return soft_max_pool2d(
            self.input(call), gate, g.kernel_size, g.stride, g.padding, g.dilation, ceil_mode=g.ceil_mode,
            return_indices=self.returns_indices(call),
        )  # fmt: skip
