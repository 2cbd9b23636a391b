"""An independent re-implementation of the deep-network rules, for the tests (written apart from the rules).

The engine's rules hand-write each backward; this reference writes each surrogate as a forward expression
whose autograd derivative is the surrogate backward, and joins it to the exact forward with a straight-through
sum ``exact.detach() + (surrogate - surrogate.detach())``:
- activations: z * g.detach() with g the gate (the product's derivative is g);
- LayerNorm / GroupNorm: (x - mean.detach()) * rsqrt(var.detach() + eps) * w + b;
- attention: softmax(S_st) v with S_st = (S / T).detach() + (S - S.detach()) (the value S / T, the gradient
  of S), or softmax(S / T).detach() v through the values only;
- max-pool: the softmax pool over unfolded windows (padding excluded by -inf weights).
``nn.MultiheadAttention`` is swapped for an explicit module (the fused path inside it is not reachable from
outside); the other calls are reached by a TorchFunctionMode of its own, so functional attention (Swin,
MaxViT) is covered too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


def _phi(u: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(u / math.sqrt(2)))


def _straight(exact: Tensor, surrogate: Tensor) -> Tensor:
    return exact.detach() + (surrogate - surrogate.detach())


class _Reference(TorchFunctionMode):
    def __init__(self, options: dict):
        super().__init__()
        self.o = options
        self.calls: dict[str, int] = {}

    def _count(self, kind):
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        o = self.o
        if func in (F.relu, torch.relu, Tensor.relu, torch.relu_, Tensor.relu_) and o.get("relu"):
            z = args[0]
            self._count("relu")
            shape, t = o["relu"]
            g = _phi(z / t) if shape == "normal_cdf" else torch.sigmoid(z / t)
            return _straight(torch.relu(z), z * g.detach())
        if func is F.gelu and o.get("gelu"):
            z = args[0]
            self._count("gelu")
            return _straight(func(*args, **kwargs), z * _phi(z / o["gelu"]).detach())
        if func is F.silu and o.get("silu"):
            z = args[0]
            self._count("silu")
            return _straight(F.silu(z), z * torch.sigmoid(z / o["silu"]).detach())
        if func is F.layer_norm and o.get("norm"):
            self._count("norm")
            x, shape = args[0], args[1]
            w, b = (list(args[2:4]) + [kwargs.get("weight"), kwargs.get("bias")])[:2]
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            dims = tuple(range(x.dim() - len(shape), x.dim()))
            mean, var = x.mean(dims, keepdim=True).detach(), x.var(dims, keepdim=True, unbiased=False).detach()
            y = (x - mean) * torch.rsqrt(var + eps)
            y = y * w if w is not None else y
            y = y + b if b is not None else y
            return _straight(func(*args, **kwargs), y)
        if func is F.group_norm and o.get("norm"):
            self._count("norm")
            x, groups = args[0], args[1]
            w, b = (list(args[2:4]) + [kwargs.get("weight"), kwargs.get("bias")])[:2]
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            xg = x.reshape(x.shape[0], groups, -1)
            mean, var = xg.mean(-1, keepdim=True).detach(), xg.var(-1, keepdim=True, unbiased=False).detach()
            y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * w.reshape(shape) if w is not None else y
            y = y + b.reshape(shape) if b is not None else y
            return _straight(func(*args, **kwargs), y)
        if func in (F.softmax, torch.softmax, Tensor.softmax) and o.get("attention"):
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if x.dim() >= 3 and dim is not None and dim % x.dim() == x.dim() - 1:
                self._count("attention")
                t, detach = o["attention"]
                if detach:
                    return func(*args, **kwargs).detach()
                s = (x / t).detach() + (x - x.detach())
                return _straight(func(*args, **kwargs), torch.softmax(s, -1))
        if func is F.scaled_dot_product_attention and o.get("attention"):
            self._count("attention")
            return self.attention(*args, **kwargs)
        if func is F.max_pool2d and o.get("maxpool"):
            self._count("maxpool")
            return self.pool(*args, **kwargs)
        return func(*args, **kwargs)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        t, detach = self.o["attention"]
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = q @ k.transpose(-2, -1) * scale
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        exact = torch.softmax(s, -1) @ v
        if detach:
            soft = torch.softmax(s / t, -1).detach() @ v
        else:
            soft = torch.softmax((s / t).detach() + (s - s.detach()), -1) @ v
        return _straight(exact, soft)

    def pool(self, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        t, detach = self.o["maxpool"]
        exact = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        n, c, h, w = x.shape
        ho, wo = exact.shape[-2:]
        values = F.unfold(x.reshape(n * c, 1, h, w), kernel_size, dilation, padding, stride or kernel_size)
        inside = F.unfold(torch.ones(1, 1, h, w, dtype=x.dtype), kernel_size, dilation, padding, stride or kernel_size)
        logits = (values / t).masked_fill(inside == 0, float("-inf"))
        weights = torch.softmax(logits, 1)
        weights = weights.detach() if detach else weights
        soft = (values * weights).sum(1).reshape(n, c, ho, wo)
        return _straight(exact, soft)


class _ExplicitMHA(nn.Module):
    """nn.MultiheadAttention (batch_first, self-attention, no masks) written out, calling the reference's
    attention through F.scaled_dot_product_attention."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, query, key, value, need_weights=False, **kwargs):
        m = self.mha
        x = query if m.batch_first else query.transpose(0, 1)
        n, length, e = x.shape
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
        heads = m.num_heads

        def split(y):
            return y.reshape(n, length, heads, e // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = F.linear(out.transpose(1, 2).reshape(n, length, e), m.out_proj.weight, m.out_proj.bias)
        return (out if m.batch_first else out.transpose(0, 1)), None


def _swap_mha(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, _ExplicitMHA(child))
        else:
            _swap_mha(child)
    return model


def reference_pullback(model: nn.Module, x: Tensor, target: int, options: dict) -> tuple[Tensor, dict]:
    """The input gradient of logit ``target`` (summed over the batch) under the reference surrogates.

    options: {"relu": (shape, T), "gelu": T, "silu": T, "norm": True, "attention": (T, detach),
    "maxpool": (T, detach)}; a missing key keeps that kind's exact gradient. ``model`` is changed (its
    nn.MultiheadAttention modules swapped): pass a copy. Returns the gradient and the calls per kind.
    """
    model = _swap_mha(model)
    xr = x.detach().clone().requires_grad_(True)
    mode = _Reference(options)
    with mode:
        out = model(xr)
    (g,) = torch.autograd.grad(out[:, target].sum(), xr)
    return g, mode.calls
