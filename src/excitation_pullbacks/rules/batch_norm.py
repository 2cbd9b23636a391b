"""BatchNorm pieces: eval-mode BatchNorm with frozen parameters, and the in-place soft ReLU of its output.

``frozen_batch_norm(x, ...)``: eval-mode F.batch_norm bit for bit whose backward keeps only the (C,) scale.
``soft_relu_of_batch_norm(z, gate, x, ...)``: ``soft_relu(z, gate)`` applied in place for z = batch_norm(x)
    (+ addends), as the model's in-place ReLU is: it keeps x instead of z and recomputes z in the backward.
The canonizer that decides where these apply is :class:`~excitation_pullbacks.canonizers.LeanBatchNorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..gates import Gate
from . import batch_norm_kernel
from .activations import gated_grad, soft_relu

__all__ = ["RECOMPUTE_CHUNK", "frozen_batch_norm", "soft_relu_of_batch_norm"]


#: Elements per batch chunk when a backward recomputes an activation on CPU: the recomputed part stays in
#: cache and in the allocator's reused memory instead of a fresh full-size buffer.
RECOMPUTE_CHUNK = 1 << 18


class _SoftReLUOfBatchNorm(torch.autograd.Function):
    """relu_(z) in place for z = batch_norm(x, ...) + sum(addends), the forward's own values; the backward
    recomputes z from x and the addends: in one CPU kernel pass with the gate where it applies
    (:mod:`~excitation_pullbacks.rules.batch_norm_kernel`), else with the same torch ops in batch chunks."""

    @staticmethod
    def forward(ctx, z: Tensor, gate: Gate, channel_dim: int, eps: float, x, mean, var, weight, bias, *addends):
        ctx.gate, ctx.channel_dim, ctx.eps = gate, channel_dim, eps
        ctx.save_for_backward(x, mean, var, weight, bias, *addends)
        ctx.mark_dirty(z)
        return z.relu_()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, mean, var, weight, bias, *addends = ctx.saved_tensors
        if ctx.channel_dim == 1:  # one CPU pass where the kernel applies
            result = batch_norm_kernel.soft_relu_grad(grad, ctx.gate, x, mean, var, weight, bias, ctx.eps, addends)
            if result is not None:
                return (result,) + (None,) * (8 + len(addends))
        result = torch.empty_like(grad)
        # CPU: batch chunks; elsewhere one pass (a kernel launch per chunk would cost more than it saves)
        step = max(1, RECOMPUTE_CHUNK // max(1, x[0].numel())) if x.device.type == "cpu" else x.shape[0]
        for i in range(0, x.shape[0], step):
            part = slice(i, i + step)
            z = F.batch_norm(x[part], mean, var, weight, bias, False, 0.0, ctx.eps)
            for a in addends:
                z.add_(a[part])
            gated_grad(grad[part], z, ctx.gate, ctx.channel_dim, out=result[part])
        return (result,) + (None,) * (8 + len(addends))


def soft_relu_of_batch_norm(
    z: Tensor, gate: Gate, x: Tensor, mean, var, weight, bias, eps: float, addends=(), channel_dim: int = 1
) -> Tensor:
    """``soft_relu(z, gate)`` in place, for z the output of eval-mode ``F.batch_norm(x, mean, var, weight,
    bias, eps=eps)`` (x: (N, C, ...)) with ``addends`` of z's shape then added in place (a residual sum), unchanged
    since. Returns z.

    It keeps x and the addends (which the network keeps anyway) instead of z, so the forward allocates
    nothing, as the model's in-place ReLU does; the backward recomputes z. x and the addends must not be
    changed in place before the backward (autograd reports it if they are; the native BatchNorm keeps x too).
    A hard or absent gate falls back to ``soft_relu`` (out of place).
    """
    gate = gate.resolve("relu")
    if gate.is_none or gate.is_hard:
        return soft_relu(z, gate, channel_dim)
    return _SoftReLUOfBatchNorm.apply(z, gate, channel_dim, eps, x, mean, var, weight, bias, *addends)


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
