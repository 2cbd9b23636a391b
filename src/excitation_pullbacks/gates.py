"""Gate shapes: what multiplies the gradient at one call site (``Gate``), validated where they are made.

A ReLU call site z -> relu(z) keeps its forward value; its backward multiplies the incoming gradient by
``Gate(z)`` instead of the hard gate 1[z > 0]. A max-pool call site keeps the exact max forward; its
backward is the gradient of a softmax pool whose temperature and detach flag come from its ``Gate``.
A SiLU or GELU call site z -> z * s(z) (s = sigmoid, resp. the normal CDF Phi or its tanh approximation)
keeps its forward value; its backward multiplies the gradient by ``Gate(z)`` instead of the exact
derivative s(z) + z s'(z). The shape ``own`` is the activation's own gate s(z / T): at T = 1 the gates are
those of the network, detached, so a bias-free network is f(x) = <pullback(x), x> exactly.
A normalisation site (LayerNorm, GroupNorm) takes ``frozen`` (mean and variance constants in the backward)
or ``hard`` (its exact gradient); an attention site ``softmax`` at T (the backward through
softmax(q k^T * scale / T); ``detach``: through the values only) or ``hard``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ATTENTION_SHAPES",
    "NORM_SHAPES",
    "POOL_PADDINGS",
    "POOL_SHAPES",
    "RELU_SHAPES",
    "Gate",
    "Temperature",
    "check_temperature",
]

RELU_SHAPES = ("sigmoid", "normal_cdf", "normal_cdf_tanh", "softsign", "own", "hard", "none")
POOL_SHAPES = ("softmax", "hard", "none")
POOL_PADDINGS = ("exclude", "zero")
#: Normalisation sites: ``frozen`` (statistics constant in the backward: the fixed affine map) or ``hard``.
NORM_SHAPES = ("frozen", "hard")
#: Attention sites: ``softmax`` (the softened attention's backward at T) or ``hard`` (the exact gradient).
ATTENTION_SHAPES = ("softmax", "hard")
_SHAPES = tuple(dict.fromkeys(RELU_SHAPES + POOL_SHAPES + NORM_SHAPES + ATTENTION_SHAPES))
_OWN = {"silu": "sigmoid", "gelu": "normal_cdf", "gelu_tanh": "normal_cdf_tanh"}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_ALIASES = {"phi": "normal_cdf", "ndtr": "normal_cdf", "vanilla": "hard", "identity": "none"}

Temperature = float | Tensor


def check_temperature(temperature: Temperature) -> None:
    """ValueError unless ``temperature`` is a number >= 0 or a non-empty tensor of them (inf allowed: no gate).
    The one check of a temperature; every type that takes one calls it where the value enters."""
    if isinstance(temperature, Tensor):
        if temperature.numel() == 0:
            raise ValueError("temperature tensor is empty")
        if torch.isnan(temperature).any() or (temperature < 0).any():
            raise ValueError("temperature must be >= 0 and not NaN (got a tensor with negative or NaN entries)")
        return
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number or a tensor, got {type(temperature).__name__}")  # noqa: TRY004
    if not temperature >= 0:  # negative or NaN; one comparison, which torch.compile traces for a symbolic T
        raise ValueError(f"temperature must be >= 0 and not NaN, got {temperature}")


@dataclass(frozen=True, eq=False)
class Gate:
    """What one call site multiplies the gradient by.

    shape: ReLU, SiLU and GELU sites: ``sigmoid`` sigmoid(u) (paper default), ``normal_cdf`` Phi(u),
        ``normal_cdf_tanh`` (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) / 2 (the tanh approximation of Phi
        that GELU(approximate="tanh") uses), ``softsign`` (1 + u/(1+|u|))/2, with u = z/T;
        ``own`` the activation's own gate: sigmoid at SiLU, normal_cdf at GELU, normal_cdf_tanh at tanh
        GELU, and the hard gate at ReLU (1[z>0]) and max-pool sites; ``hard`` the vanilla gradient (1[z>0]
        at ReLU, the exact derivative at SiLU/GELU: the native backward); ``none`` 1.
        Max-pool sites: ``hard`` (exact max gradient), ``none`` (uniform weights over the window, the
        T -> inf limit), anything else the softmax-pool gradient at ``temperature``.
        Normalisation sites: ``frozen`` (mean and variance constants in the backward; T unused) or ``hard``.
        Attention sites: ``softmax`` (backward through softmax(q k^T * scale / T)) or ``hard``.
    temperature: T >= 0; a float, or a tensor of shape (C,) for one temperature per channel (dim 1 of z,
        or the last dim where z comes straight from an nn.Linear, see ``Site.channel_dim``).
        T = 0 is the hard gate (vanilla gradient) for every shape; T = inf is no gating.
    detach: max-pool: detach the softmax weights (gradient = weights) instead of the paper's full
        gradient of sum_j x_j softmax(x/T)_j; attention: detach the attention weights (gradient through the
        values only) instead of through queries, keys and values.
    padding: max-pool only; ``exclude`` (default): padded positions take no part in the softmax pool, as
        they take none in the max; ``zero``: the pool's explicit padding enters each window as zeros (in the
        softmax and in the weighted sum), as an unfold-based soft pool (the paper's Listing 2) computes it.
        Ceil-mode windows past the padded input are excluded either way. The forward stays the exact max.
    """

    shape: str = "sigmoid"
    temperature: Temperature = 0.3
    detach: bool = False
    padding: str = "exclude"

    def __post_init__(self) -> None:
        shape = _ALIASES.get(self.shape, self.shape)
        if shape not in _SHAPES:
            raise ValueError(f"unknown gate shape {self.shape!r}; choose one of {', '.join(_SHAPES)}")
        check_temperature(self.temperature)
        if self.padding not in POOL_PADDINGS:
            raise ValueError(f"unknown pool padding {self.padding!r}; choose one of {', '.join(POOL_PADDINGS)}")
        object.__setattr__(self, "shape", shape)

    @property
    def is_hard(self) -> bool:
        """True when the gate is exactly the vanilla one (shape 'hard' or T = 0 everywhere)."""
        if self.shape == "hard":
            return True
        if self.shape in ("none", "frozen"):
            return False
        t = self.temperature
        return bool((t == 0).all()) if isinstance(t, Tensor) else t == 0

    @property
    def is_none(self) -> bool:
        """True when the gate is 1 everywhere (shape 'none' or T = inf everywhere)."""
        if self.shape == "none":
            return True
        if self.shape in ("hard", "frozen"):
            return False
        t = self.temperature  # T >= 0: t == inf, which torch.compile also traces for a symbolic T
        return bool(torch.isinf(t).all()) if isinstance(t, Tensor) else t == math.inf

    def resolve(self, kind: str) -> Gate:
        """The concrete gate for a site of ``kind`` (relu, maxpool, silu, gelu, gelu_tanh): replaces the shape
        ``own`` by the activation's own gate shape; other gates are returned as they are."""
        if self.shape != "own":
            return self
        if self.is_none:
            return Gate("none", math.inf)
        own = _OWN.get(kind)
        if own is None or self.is_hard:
            return Gate("hard", 0.0)
        return Gate(own, self.temperature, self.detach, self.padding)

    def temperature_like(self, z: Tensor, channel_dim: int = 1) -> Temperature:
        """The temperature broadcastable against z: a float, or the (C,) tensor shaped (1, C, 1, ...) with C
        at ``channel_dim`` of z."""
        t = self.temperature
        if not isinstance(t, Tensor):
            return float(t)
        if t.numel() == 1:
            return float(t)
        dim = channel_dim % z.dim() if z.dim() else 0
        if z.dim() < 2 or z.shape[dim] != t.numel():
            raise ValueError(
                f"per-channel temperature has {t.numel()} entries but the gated tensor has shape {tuple(z.shape)} "
                f"(channels at dim {channel_dim})"
            )
        shape = [1] * z.dim()
        shape[dim] = -1
        return t.to(device=z.device, dtype=z.dtype).reshape(shape)

    def __call__(self, z: Tensor, channel_dim: int = 1) -> Tensor:
        """Gate values sigma(z), same shape as z, in [0, 1]; the hard gate is 1[z > 0] (the ReLU's).
        Allocates one tensor. Resolve ``own`` first (:meth:`resolve`)."""
        if self.is_hard:
            return (z > 0).to(z.dtype)
        if self.is_none:
            return torch.ones_like(z)
        if self.shape == "own":
            raise ValueError("the gate shape 'own' depends on the site: call gate.resolve(site.activation) first")
        t = self.temperature_like(z, channel_dim)
        u = z / t
        if self.shape == "normal_cdf":
            g = torch.special.ndtr(u)
        elif self.shape == "normal_cdf_tanh":
            g = (u * u).mul_(0.044715).add_(1).mul_(u).mul_(_SQRT_2_OVER_PI).tanh_().add_(1).mul_(0.5)
        elif self.shape == "softsign":
            g = u.div_(u.abs().add_(1)).add_(1).mul_(0.5)
        else:  # sigmoid, also for max-pool shapes used at a ReLU site
            g = u.sigmoid_()
        if isinstance(t, Tensor) and (t == 0).any():  # channels with T = 0 are hard
            g = torch.where(t == 0, (z > 0).to(z.dtype), g)
        return g

    def __repr__(self) -> str:
        t = self.temperature
        ts = f"tensor({t.numel()})" if isinstance(t, Tensor) and t.numel() > 1 else f"{float(t):g}"
        padding = ", padding='zero'" if self.padding == "zero" else ""
        return f"Gate({self.shape!r}, T={ts}{', detach' if self.detach else ''}{padding})"
