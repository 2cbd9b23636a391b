"""Activation rules: ReLU, SiLU and GELU calls, forward bit for bit, backward grad * gate(z).

``soft_relu(z, gate)``: forward relu(z); backward grad * gate(z) in place of grad * 1[z > 0].
``soft_silu(z, gate)``, ``soft_gelu(z, gate, approximate)``: forward F.silu / F.gelu; backward grad * gate(z)
    in place of the exact derivative (a hard gate keeps the native backward).
In-place calls run out of place when their gate is soft (the gate needs z, which the in-place op would
overwrite), except an in-place ReLU of a frozen BatchNorm output that a canonizer recorded: that one runs in
place and recomputes z in the backward (:mod:`~excitation_pullbacks.rules.batch_norm`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..gates import Gate
from . import gate_kernel
from .base import Call, Rule

__all__ = ["GELU", "ReLU", "SiLU", "gated_grad", "soft_gelu", "soft_relu", "soft_silu"]


_SIGMOID_ONE = {torch.float64: 40.0, torch.float32: 20.0}


def gated_grad(grad: Tensor, z: Tensor, gate: Gate, channel_dim: int, out: Tensor | None = None) -> Tensor:
    """grad * gate(z) for a resolved, soft gate (written into ``out`` when given)."""
    t = gate.temperature
    if gate.shape == "sigmoid" and not isinstance(t, Tensor) and 0 < t < math.inf:
        # grad * sigmoid(z / T) in one fused pass: the derivative of T * softplus(z / T). Above the
        # threshold sigmoid is 1 to the dtype's precision (and exp would overflow half precision).
        threshold = _SIGMOID_ONE.get(z.dtype, 10.0)
        if out is None:
            return torch.ops.aten.softplus_backward(grad, z, 1.0 / t, threshold)
        return torch.ops.aten.softplus_backward.grad_input(grad, z, 1.0 / t, threshold, grad_input=out)
    if out is None:
        fused = gate_kernel.normal_cdf_grad(grad, z, gate)  # one CPU pass where it applies
        if fused is not None:
            return fused
    g = gate(z, channel_dim)
    return g.mul_(grad) if out is None else torch.mul(g, grad, out=out)


class _SoftReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gate: Gate, channel_dim: int) -> Tensor:
        ctx.gate, ctx.channel_dim = gate, channel_dim
        ctx.save_for_backward(z)
        return torch.relu(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return gated_grad(grad, z, ctx.gate, ctx.channel_dim), None, None


class _NoGate(torch.autograd.Function):
    """Forward fn(z), backward the identity (the gate fixed at 1)."""

    @staticmethod
    def forward(ctx, z: Tensor, fn) -> Tensor:
        return fn(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def soft_relu(z: Tensor, gate: Gate, channel_dim: int = 1) -> Tensor:
    """relu(z) with backward grad * gate(z). z: any shape; per-channel gates index ``channel_dim``."""
    gate = gate.resolve("relu")
    if gate.is_none:
        return _NoGate.apply(z, torch.relu)
    if gate.is_hard:
        return torch.relu(z)
    return _SoftReLU.apply(z, gate, channel_dim)


def _smooth_forward(z: Tensor, approximate: str | None) -> Tensor:
    return F.silu(z) if approximate is None else F.gelu(z, approximate=approximate)


def _smooth_native_backward(grad: Tensor, z: Tensor, approximate: str | None) -> Tensor:
    if approximate is None:
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate=approximate)


class _SoftSmooth(torch.autograd.Function):
    """Forward F.silu (approximate None) or F.gelu; backward grad * gate(z), the native backward on
    channels whose temperature is 0."""

    @staticmethod
    def forward(ctx, z: Tensor, gate: Gate, channel_dim: int, approximate: str | None) -> Tensor:
        ctx.gate, ctx.channel_dim, ctx.approximate = gate, channel_dim, approximate
        ctx.save_for_backward(z)
        return _smooth_forward(z, approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        gate, dim = ctx.gate, ctx.channel_dim
        g = gated_grad(grad, z, gate, dim)
        t = gate.temperature
        if isinstance(t, Tensor) and t.numel() > 1 and (t == 0).any():  # hard channels: exact derivative
            hard = gate.temperature_like(z, dim) == 0
            g = torch.where(hard, _smooth_native_backward(grad, z, ctx.approximate), g)
        return g, None, None, None


def _soft_smooth(z: Tensor, gate: Gate, channel_dim: int, approximate: str | None) -> Tensor:
    gate = gate.resolve("silu" if approximate is None else "gelu_tanh" if approximate == "tanh" else "gelu")
    if gate.is_hard:
        return _smooth_forward(z, approximate)  # the native op and its exact derivative
    if gate.is_none:
        return _NoGate.apply(z, lambda v: _smooth_forward(v, approximate))
    return _SoftSmooth.apply(z, gate, channel_dim, approximate)


def soft_silu(z: Tensor, gate: Gate, channel_dim: int = 1) -> Tensor:
    """F.silu(z) = z * sigmoid(z) with backward grad * gate(z) (``own``: sigmoid(z / T), exact at T = 1 for
    the detached gate); a hard gate keeps the exact derivative. z: any shape; per-channel gates index
    ``channel_dim``."""
    return _soft_smooth(z, gate, channel_dim, None)


def soft_gelu(z: Tensor, gate: Gate, approximate: str = "none", channel_dim: int = 1) -> Tensor:
    """F.gelu(z, approximate=approximate) = z * Phi(z) (or its tanh approximation) with backward
    grad * gate(z) (``own``: Phi(z / T), or the tanh approximation of Phi at z / T for ``approximate="tanh"``,
    so that T = 1 is the detached gate of either form); a hard gate keeps the exact derivative."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _soft_smooth(z, gate, channel_dim, approximate)


def _relu_stub(input):  # torch.relu(input), torch.relu_(input), Tensor.relu(self), Tensor.relu_(self)
    pass


def _gelu_stub(input, approximate="none"):  # F.gelu (a builtin)
    pass


class ReLU(Rule):
    """ReLU calls: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place forms."""

    kind = "relu"
    name = "relu"
    modules = (nn.ReLU,)
    functions: ClassVar[dict] = {
        F.relu: None,
        torch.relu: _relu_stub,
        Tensor.relu: _relu_stub,
        torch.relu_: _relu_stub,
        Tensor.relu_: _relu_stub,
    }
    _inplace: ClassVar[frozenset] = frozenset({torch.relu_, Tensor.relu_})

    def apply(self, call, site, gate, canonizers):
        z = self.input(call)
        made = None
        for canonizer in canonizers:
            made = made or canonizer.take(z)
        if made is not None and z.requires_grad and (call.func in self._inplace or call.get("inplace", False)):
            return made.soft_relu_(z, gate, site.channel_dim)
        return soft_relu(z, gate, site.channel_dim)  # soft gates need z intact: out of place


class SiLU(Rule):
    """SiLU calls: ``nn.SiLU``, ``F.silu`` (also in place, run out of place when soft)."""

    kind = "silu"
    name = "silu"
    modules = (nn.SiLU,)
    functions: ClassVar[dict] = {F.silu: None}

    def apply(self, call, site, gate, canonizers):
        return soft_silu(self.input(call), gate, site.channel_dim)


class GELU(Rule):
    """GELU calls: ``nn.GELU``, ``F.gelu`` in both ``approximate`` forms."""

    kind = "gelu"
    name = "gelu"
    modules = (nn.GELU,)
    functions: ClassVar[dict] = {F.gelu: _gelu_stub}

    def details(self, call: Call) -> dict:
        return {"approximate": call["approximate"]}

    def apply(self, call, site, gate, canonizers):
        return soft_gelu(self.input(call), gate, call["approximate"], site.channel_dim)
