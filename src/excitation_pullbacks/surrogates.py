"""Autograd functions with an exact forward and a surrogate backward.

``soft_relu(z, gate)``: forward relu(z) bit for bit; backward grad * gate(z).
``soft_max_pool2d(x, ...)``: forward F.max_pool2d bit for bit; backward the gradient of the softmax pool
    s = sum_j x_j w_j, w = softmax(x / T) over each window (padding excluded, as in the max), i.e.
    ds/dx_j = w_j (1 + (x_j - s) / T), or w_j alone with detached weights.

The pool backward loops over the k_h * k_w window offsets with strided views of the input, so it never
materialises the k_h * k_w-fold unfolded input that an unfold-based soft pool needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from .gates import Gate

__all__ = ["soft_relu", "soft_max_pool2d", "pool_geometry", "soft_pool_backward", "frozen_batch_norm"]


class _SoftReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gate: Gate) -> Tensor:
        ctx.gate = gate
        ctx.save_for_backward(z)
        return torch.relu(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return ctx.gate(z).mul_(grad), None


class _NoGateReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        return torch.relu(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad


def soft_relu(z: Tensor, gate: Gate) -> Tensor:
    """relu(z) with backward grad * gate(z). z: any shape; per-channel gates index dim 1."""
    if gate.is_none:
        return _NoGateReLU.apply(z)
    return _SoftReLU.apply(z, gate)


def pool_geometry(kernel_size, stride, padding, dilation):
    """Normalise max-pool arguments to 2-tuples (stride defaults to kernel_size, as in F.max_pool2d)."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride is not None and (not isinstance(stride, (list, tuple)) or len(stride)) else k
    return k, s, _pair(padding), _pair(dilation)


def _windows(xp: Tensor, k, s, d, out_hw):
    """Strided views of the padded input xp (N, C, Hp, Wp), one per window offset, each (N, C, Ho, Wo)."""
    ho, wo = out_hw
    for i in range(k[0]):
        for j in range(k[1]):
            yield (
                slice(i * d[0], i * d[0] + s[0] * (ho - 1) + 1, s[0]),
                slice(j * d[1], j * d[1] + s[1] * (wo - 1) + 1, s[1]),
            )


def soft_pool_backward(x: Tensor, out: Tensor, grad: Tensor, gate: Gate, k, s, p, d) -> Tensor:
    """Input gradient of the softmax pool.

    x: (N, C, H, W) pool input; out: (N, C, Ho, Wo) its exact max pool (the per-window shift that keeps the
    exponentials finite); grad: (N, C, Ho, Wo). Returns (N, C, H, W).
    """
    n, c, h, w = x.shape
    ho, wo = out.shape[-2:]
    extra_h = max(0, (ho - 1) * s[0] + (k[0] - 1) * d[0] + 1 - h - p[0])  # ceil_mode windows past the edge
    extra_w = max(0, (wo - 1) * s[1] + (k[1] - 1) * d[1] + 1 - w - p[1])
    uniform = gate.is_none
    t = 1.0 if uniform else gate.temperature_like(x)
    t_max = float(t.max()) if isinstance(t, Tensor) else t
    # Positions outside the input get a value whose weight exp((fill - max)/T) is exactly 0.
    fill = float(x.detach().amin()) - 1000.0 * t_max if x.numel() else 0.0
    xp = F.pad(x, (p[1], extra_w, p[0], extra_h), value=fill)
    views = list(_windows(xp, k, s, d, (ho, wo)))
    if uniform:
        valid = F.pad(torch.ones((1, 1, h, w), dtype=x.dtype, device=x.device), (p[1], extra_w, p[0], extra_h))

    def weight(sl):  # unnormalised window weight, (N, C, Ho, Wo) or (1, 1, Ho, Wo)
        if uniform:
            return valid[:, :, sl[0], sl[1]]
        return (xp[:, :, sl[0], sl[1]] - out).div_(t).exp_()

    z = torch.zeros_like(out)
    soft = None if (gate.detach or uniform) else torch.zeros_like(out)
    for sl in views:
        e = weight(sl)
        z = z + e
        if soft is not None:
            soft.addcmul_(e, xp[:, :, sl[0], sl[1]])
    coef = grad / z
    if soft is not None:
        soft.div_(z)
    gp = torch.zeros_like(xp)
    for sl in views:
        e = weight(sl) * coef
        if soft is not None:  # w_j (1 + (x_j - s) / T)
            e.mul_((xp[:, :, sl[0], sl[1]] - soft).div_(t).add_(1))
        gp[:, :, sl[0], sl[1]] += e
    return gp[:, :, p[0] : p[0] + h, p[1] : p[1] + w]


class _SoftMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gate: Gate, k, s, p, d, ceil_mode: bool, return_indices: bool):
        if return_indices:
            out, idx = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
            ctx.mark_non_differentiable(idx)
        else:
            out = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode)
        ctx.save_for_backward(x)  # not out: callers may modify it in place (e.g. an in-place ReLU)
        ctx.geometry = (gate, k, s, p, d, ceil_mode)
        return (out, idx) if return_indices else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, *unused):
        (x,) = ctx.saved_tensors
        gate, k, s, p, d, ceil_mode = ctx.geometry
        squeeze = x.dim() == 3
        if squeeze:
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        out = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode)
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
    if not gate.is_none and not isinstance(gate.temperature, Tensor) and math.isinf(gate.temperature):
        gate = Gate("none", math.inf)
    return _SoftMaxPool2d.apply(x, gate, k, s, p, d, bool(ceil_mode), bool(return_indices))


class _FrozenBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> Tensor:
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        ctx.save_for_backward(scale)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        return grad * scale.view(shape), None, None, None, None, None


def frozen_batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias, eps: float) -> Tensor:
    """Eval-mode F.batch_norm, bit for bit, whose backward keeps only the (C,) scale weight/sqrt(var+eps).

    The native op saves its whole input for the weight gradient; with frozen parameters only the input
    gradient grad * scale is needed, so this frees one activation per BatchNorm during a pullback.
    """
    return _FrozenBatchNorm.apply(x, running_mean, running_var, weight, bias, eps)
