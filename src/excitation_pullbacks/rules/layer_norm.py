"""Normalisation rules: LayerNorm and GroupNorm with their statistics constant in the backward.

The gate ``frozen`` pulls a normalisation back as the fixed affine map x -> w (x - mu) / sigma + b with mu and
sigma those of the forward: the backward is grad * w / sigma, per element, instead of the exact gradient
(which also flows through mu and sigma). The forward is the native op's, bit for bit. This is the deep-network
paper's reading of LayerNorm (over the last dims: ``nn.LayerNorm``, ``F.layer_norm``, and channel-first
LayerNorm2d, which permutes around ``F.layer_norm``); it applies to GroupNorm in the same way (statistics per
sample and group over (C / G, H, W), constants), so ``F.group_norm`` / ``nn.GroupNorm`` take it too.
BatchNorm in eval mode is already an affine map and needs no rule.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .base import Call, Rule

__all__ = ["GroupNorm", "LayerNorm", "frozen_group_norm", "frozen_layer_norm"]


def _affine_grads(ctx, grad: Tensor, x_hat_of, reduce_dims, shape) -> tuple:
    """Weight and bias gradients (exact: the affine map's own), computed only when they are needed."""
    need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    gw = (grad * x_hat_of()).sum(reduce_dims).reshape(shape) if need_w else None
    gb = grad.sum(reduce_dims).reshape(shape) if need_b else None
    return gw, gb


class _FrozenLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, normalized_shape, weight, bias, eps: float) -> Tensor:
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.dims = len(normalized_shape)
        keep = x if ctx.needs_input_grad[2] else None
        ctx.save_for_backward(rstd, weight, keep, mean if keep is not None else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rstd, weight, x, mean = ctx.saved_tensors
        scale = rstd if weight is None else rstd * weight
        gx = grad * scale if ctx.needs_input_grad[0] else None
        lead = tuple(range(grad.dim() - ctx.dims))
        shape = grad.shape[grad.dim() - ctx.dims :]
        gw, gb = _affine_grads(ctx, grad, lambda: (x - mean) * rstd, lead, shape)
        return gx, None, gw, gb, None


def frozen_layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` bit for bit; backward grad * w / sigma (mean and variance constants).

    x: (..., *normalized_shape); weight, bias: normalized_shape or None. Returns x's shape.
    """
    return _FrozenLayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps)


class _FrozenGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, groups: int, weight, bias, eps: float) -> Tensor:
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.groups = groups
        keep = x if ctx.needs_input_grad[2] else None
        ctx.save_for_backward(rstd, weight, keep, mean if keep is not None else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rstd, weight, x, mean = ctx.saved_tensors
        n, c = grad.shape[:2]
        g = ctx.groups
        spatial = (1,) * (grad.dim() - 2)

        def per_element(stat: Tensor) -> Tensor:  # (N, G) -> (N, C, 1, ...)
            return stat.repeat_interleave(c // g, dim=1).reshape(n, c, *spatial)

        gx = None
        if ctx.needs_input_grad[0]:
            scale = per_element(rstd)
            if weight is not None:
                scale = scale * weight.reshape(1, c, *spatial)
            gx = grad * scale
        dims = (0, *range(2, grad.dim()))
        gw, gb = _affine_grads(ctx, grad, lambda: (x - per_element(mean)) * per_element(rstd), dims, (c,))
        return gx, None, gw, gb, None


def frozen_group_norm(x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` bit for bit; backward grad * w / sigma (per sample and group statistics constants).

    x: (N, C, ...); weight, bias: (C,) or None. Returns x's shape.
    """
    return _FrozenGroupNorm.apply(x, int(num_groups), weight, bias, eps)


class LayerNorm(Rule):
    """LayerNorm calls: ``nn.LayerNorm`` (and its subclasses: torchvision's LayerNorm2d), ``F.layer_norm``."""

    kind = "norm"
    name = "layer_norm"
    modules = (nn.LayerNorm,)
    functions: ClassVar[dict] = {F.layer_norm: None}

    def apply(self, call: Call, site, gate, canonizers):
        return frozen_layer_norm(call["input"], call["normalized_shape"], call["weight"], call["bias"], call["eps"])


class GroupNorm(Rule):
    """GroupNorm calls: ``nn.GroupNorm``, ``F.group_norm``."""

    kind = "norm"
    name = "group_norm"
    modules = (nn.GroupNorm,)
    functions: ClassVar[dict] = {F.group_norm: None}

    def apply(self, call: Call, site, gate, canonizers):
        return frozen_group_norm(call["input"], call["num_groups"], call["weight"], call["bias"], call["eps"])
