"""A rule for a layer type the package does not cover, in one file: LeakyReLU with a soft gate.

Forward ``F.leaky_relu`` bit for bit; backward grad * (a + (1 - a) * sigmoid(z / T)) in place of
grad * (a + (1 - a) * 1[z > 0]), a the negative slope. Registering it (``register(LeakyReLU())``) is all
pullbacks need; its sites are of kind ``leaky_relu`` (``ByType(other={"leaky_relu": Gate(...)})``).
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excitation_pullbacks import Rule


class _SoftLeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, slope: float, t: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.slope, ctx.t = slope, t
        return F.leaky_relu(z, slope)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return grad * (ctx.slope + (1 - ctx.slope) * torch.sigmoid(z / ctx.t)), None, None


class LeakyReLU(Rule):
    kind = "leaky_relu"
    name = "leaky_relu"
    modules = (nn.LeakyReLU,)
    functions: ClassVar[dict] = {F.leaky_relu: None}

    def apply(self, call, site, gate, canonizers):
        return _SoftLeakyReLU.apply(call["input"], float(call["negative_slope"]), float(gate.temperature))
