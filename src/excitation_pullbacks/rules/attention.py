"""Attention rules: the forward exact, the backward through a softened attention softmax(q k^T * scale / T).

``soft_attention(q, k, v, gate, ...)``: ``F.scaled_dot_product_attention`` bit for bit; the backward uses
A_T = softmax(S / T), S = q k^T * scale (+ mask), in place of the exact weights A: dv = A_T^T g, and, unless
``gate.detach``, dq = dS k * scale, dk = dS^T q * scale with dS = A_T * (g v^T - rowsum(A_T * g v^T)) - the
gradient of softmax(S / T) v with the 1/T scaling itself passed through as the identity, as the deep-network
paper's code does for ``nn.MultiheadAttention``. ``gate.detach``: the weights are constants, the gradient
flows through v only (the paper's code for PVT). At T = 1 without detach the backward is the exact gradient,
so the native op runs (the published default costs nothing); the hard gate (T = 0, or shape ``hard``) is the
native op too. Elsewhere the backward costs one q k^T product and softmax more than the native one, and no
second attention forward.

Where attention is computed explicitly (torchvision's Swin and MaxViT, timm without fused attention), the
rule sits at the softmax over the last dim of a score tensor of 3 or more dims: ``soft_softmax`` is the
exact softmax whose backward is that of softmax(x / T) (identity through the scaling), or zero with
``detach``. The weights then reach the values through the model's own matmul, so there dv uses the exact A;
at T = 1 both forms agree with the fused one.

``nn.MultiheadAttention`` (``F.multi_head_attention_forward``) is handled as one call, named by the module's
path: for self-attention without masks or extra key/value biases and without attention weights requested
(torchvision's ViT), the rule runs the function's own sequence of ops with the fused attention above, so the
forward stays bit for bit; other configurations keep their exact gradient, with a warning.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..gates import Gate
from .base import Call, Rule

__all__ = ["ExplicitAttention", "FusedAttention", "MultiheadAttention", "soft_attention", "soft_softmax"]


def _scores(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    """S = q k^T * scale + mask: (..., L, S), -inf where a boolean mask or causality excludes a key."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if is_causal:
        causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril_()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _SoftAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale, enable_gqa: bool, gate: Gate):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        ctx.is_causal, ctx.scale, ctx.gate = is_causal, scale, gate
        ctx.mask_shape = None if mask is None else mask.shape
        ctx.save_for_backward(q, k, v, mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q, k, v, mask = ctx.saved_tensors
        gate = ctx.gate
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.shape[-3] != q.shape[-3] else 1
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
        a = torch.softmax(_scores(q, k, mask, ctx.is_causal, scale).div_(float(gate.temperature)), dim=-1)
        dv = torch.matmul(a.transpose(-2, -1), grad)
        dq = dk = dmask = None
        if not gate.detach:
            da = torch.matmul(grad, v.transpose(-2, -1))
            ds = a.mul_(da.sub_((da * a).sum(-1, keepdim=True)))  # A_T * (dA - rowsum(dA * A_T))
            dq = torch.matmul(ds, k).mul_(scale)
            dk = torch.matmul(ds.transpose(-2, -1), q).mul_(scale)
            if mask is not None and ctx.needs_input_grad[3]:
                dmask = _reduce_to(ds, ctx.mask_shape)
        if groups > 1:
            dv = dv.unflatten(-3, (-1, groups)).sum(-3)
            dk = None if dk is None else dk.unflatten(-3, (-1, groups)).sum(-3)
        return dq, dk, dv, dmask, None, None, None, None


def _exact(gate: Gate) -> bool:
    """True where the softened backward is the exact gradient: the hard gate, or T = 1 through q, k and v."""
    if gate.is_hard:
        return True
    t = gate.temperature
    return not gate.detach and not isinstance(t, Tensor) and float(t) == 1.0


def soft_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Gate,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) with the softened backward of ``gate`` (see the module).

    q: (..., L, E); k: (..., S, E); v: (..., S, Ev); attn_mask: broadcastable to (..., L, S), boolean (True:
    attend) or additive. Returns (..., L, Ev).
    """
    if _exact(gate):  # the native op: its backward is this one, computed by the fused kernel
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return _SoftAttention.apply(q, k, v, attn_mask, is_causal, scale, enable_gqa, gate)


class _SoftSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, dtype, gate: Gate) -> Tensor:
        out = torch.softmax(x, dim, dtype=dtype)
        ctx.dim, ctx.gate = dim, gate
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.gate.detach:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        a = torch.softmax(x.to(grad.dtype) / float(ctx.gate.temperature), ctx.dim)
        dx = a.mul_(grad - (grad * a).sum(ctx.dim, keepdim=True))
        return dx.to(x.dtype), None, None, None


def soft_softmax(x: Tensor, dim: int, gate: Gate, dtype=None) -> Tensor:
    """``torch.softmax(x, dim, dtype=dtype)`` bit for bit with the backward of softmax(x / T) (identity through
    the scaling), or no gradient with ``gate.detach``. x: attention scores (..., L, S), dim -1."""
    if _exact(gate):
        return torch.softmax(x, dim, dtype=dtype)
    return _SoftSoftmax.apply(x, dim, dtype, gate)


def _sdpa_stub(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    pass  # F.scaled_dot_product_attention (a builtin)


def _softmax_stub(input, dim, dtype=None):
    pass  # torch.softmax and Tensor.softmax (builtins)


class FusedAttention(Rule):
    """``F.scaled_dot_product_attention`` calls."""

    kind = "attention"
    name = "scaled_dot_product_attention"
    functions: ClassVar[dict] = {F.scaled_dot_product_attention: _sdpa_stub}

    def input(self, call: Call) -> Tensor:
        return call["query"]

    def apply(self, call: Call, site, gate, canonizers):
        if call["dropout_p"]:
            warnings.warn(
                f"excitation: attention {site.key} runs with dropout; its exact gradient is kept",
                stacklevel=2,
            )
            return call.run()
        return soft_attention(
            call["query"], call["key"], call["value"], gate, call["attn_mask"], bool(call["is_causal"]),
            call["scale"], bool(call["enable_gqa"]),
        )  # fmt: skip


class ExplicitAttention(Rule):
    """Softmax calls over the last dim of attention scores (3 or more dims): ``F.softmax``, ``torch.softmax``,
    ``Tensor.softmax``. A softmax of 2-dim logits (a classifier's) is left alone."""

    kind = "attention"
    name = "softmax"
    functions: ClassVar[dict] = {F.softmax: None, torch.softmax: _softmax_stub, Tensor.softmax: _softmax_stub}

    def handles(self, call: Call) -> bool:
        x, dim = call["input"], call["dim"]
        return isinstance(x, Tensor) and x.dim() >= 3 and dim is not None and dim % x.dim() == x.dim() - 1

    def apply(self, call: Call, site, gate, canonizers):
        return soft_softmax(call["input"], call["dim"], gate, call["dtype"])


def _self_attention(call: Call, gate: Gate) -> Tensor:
    """``F.multi_head_attention_forward`` for self-attention (query is key is value, packed in-projection, no
    masks, no bias_k / bias_v / zero attention / static keys, no weights returned, no dropout): the function's
    own sequence of ops, with :func:`soft_attention` in place of its fused attention. Returns (L, N, E) or
    (L, E) as the function does."""
    x = call["query"]
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
    length, n, e = x.shape
    heads = call["num_heads"]
    hd = e // heads
    proj = F.linear(x, call["in_proj_weight"], call["in_proj_bias"])
    proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (t.view(length, n * heads, hd).transpose(0, 1) for t in (proj[0], proj[1], proj[2]))
    q, k, v = (t.view(n, heads, length, hd) for t in (q, k, v))
    out = soft_attention(q, k, v, gate).permute(2, 0, 1, 3).reshape(n * length, e)
    out = F.linear(out, call["out_proj_weight"], call["out_proj_bias"]).view(length, n, -1)
    return out if batched else out.squeeze(1)


def _mha_stub(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
              add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
              need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
              k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
              is_causal=False):  # fmt: skip
    pass  # F.multi_head_attention_forward's signature, for torch versions where it cannot be read


class MultiheadAttention(Rule):
    """``nn.MultiheadAttention`` calls (``F.multi_head_attention_forward``); see the module docstring."""

    kind = "attention"
    name = "multi_head_attention_forward"
    modules = (nn.MultiheadAttention,)
    functions: ClassVar[dict] = {F.multi_head_attention_forward: _mha_stub}

    def input(self, call: Call) -> Tensor:
        return call["query"]

    @staticmethod
    def supported(call: Call) -> bool:
        b = call.bound
        same = b["query"] is b["key"] and b["key"] is b["value"]
        extras = ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
        dropout = b["training"] and b["dropout_p"] > 0
        plain = not (b["add_zero_attn"] or b["need_weights"] or b["use_separate_proj_weight"] or b["is_causal"])
        return same and plain and not dropout and all(b[name] is None for name in extras)

    def apply(self, call: Call, site, gate, canonizers):
        if _exact(gate):  # T = 1 through q, k, v: the native call is this backward
            return call.run()
        if not self.supported(call):
            warnings.warn(
                f"excitation: attention {site.key} keeps its exact gradient (nn.MultiheadAttention with masks, "
                "cross-attention, dropout or attention weights requested)",
                stacklevel=2,
            )
            return call.run()
        return _self_attention(call, gate), None
