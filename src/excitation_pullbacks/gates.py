"""Gate shapes (what multiplies the gradient at one call site) and schedules (which gate where).

A ReLU call site z -> relu(z) keeps its forward value; its backward multiplies the incoming gradient by
``Gate(z)`` instead of the hard gate 1[z > 0]. A max-pool call site keeps the exact max forward; its
backward is the gradient of a softmax pool whose temperature and detach flag come from its ``Gate``.

Schedules map a :class:`Site` (one gated call in the forward pass) to a :class:`Gate`. They compose:
``ByName``, ``ByDepth`` and ``PerChannel`` fall back to a ``default`` schedule for sites they do not cover.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import Tensor

__all__ = [
    "RELU_SHAPES",
    "POOL_SHAPES",
    "Gate",
    "Site",
    "Schedule",
    "ByType",
    "ByName",
    "ByDepth",
    "PerChannel",
    "make_schedule",
]

RELU_SHAPES = ("sigmoid", "normal_cdf", "softsign", "hard", "none")
POOL_SHAPES = ("softmax", "hard", "none")
_ALIASES = {"phi": "normal_cdf", "ndtr": "normal_cdf", "vanilla": "hard", "identity": "none"}

Temperature = Union[float, Tensor]


def _check_temperature(temperature: Temperature) -> None:
    if isinstance(temperature, Tensor):
        if temperature.numel() == 0:
            raise ValueError("temperature tensor is empty")
        if torch.isnan(temperature).any() or (temperature < 0).any():
            raise ValueError("temperature must be >= 0 and not NaN (got a tensor with negative or NaN entries)")
        return
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number or a tensor, got {type(temperature).__name__}")
    if math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 and not NaN, got {temperature}")


@dataclass(frozen=True, eq=False)
class Gate:
    """What one call site multiplies the gradient by.

    shape: ReLU sites: ``sigmoid`` sigmoid(z/T) (paper default), ``normal_cdf`` Phi(z/T),
        ``softsign`` (1 + s/(1+|s|))/2 with s = z/T, ``hard`` 1[z>0] (vanilla gradient), ``none`` 1.
        Max-pool sites: ``hard`` (exact max gradient), ``none`` (uniform weights over the window, the
        T -> inf limit), anything else the softmax-pool gradient at ``temperature``.
    temperature: T >= 0; a float, or a tensor of shape (C,) for one temperature per channel (dim 1 of z).
        T = 0 is the hard gate for every shape; T = inf is no gating.
    detach: max-pool only; detach the softmax weights (gradient = weights) instead of the paper's full
        gradient of sum_j x_j softmax(x/T)_j.
    """

    shape: str = "sigmoid"
    temperature: Temperature = 0.3
    detach: bool = False

    def __post_init__(self) -> None:
        shape = _ALIASES.get(self.shape, self.shape)
        if shape not in RELU_SHAPES + POOL_SHAPES:
            raise ValueError(f"unknown gate shape {self.shape!r}; choose one of {RELU_SHAPES + ('softmax',)}")
        _check_temperature(self.temperature)
        object.__setattr__(self, "shape", shape)

    @property
    def is_hard(self) -> bool:
        """True when the gate is exactly the vanilla one (shape 'hard' or T = 0 everywhere)."""
        if self.shape == "hard":
            return True
        if self.shape == "none":
            return False
        t = self.temperature
        return bool((t == 0).all()) if isinstance(t, Tensor) else t == 0

    @property
    def is_none(self) -> bool:
        """True when the gate is 1 everywhere (shape 'none' or T = inf everywhere)."""
        if self.shape == "none":
            return True
        if self.shape == "hard":
            return False
        t = self.temperature
        return bool(torch.isinf(t).all()) if isinstance(t, Tensor) else math.isinf(t)

    def temperature_like(self, z: Tensor) -> Temperature:
        """The temperature broadcastable against z: (N, C, ...) -> a float or a (1, C, 1, ...) tensor."""
        t = self.temperature
        if not isinstance(t, Tensor):
            return float(t)
        if t.numel() == 1:
            return float(t)
        if z.dim() < 2 or z.shape[1] != t.numel():
            raise ValueError(
                f"per-channel temperature has {t.numel()} entries but the gated tensor has shape {tuple(z.shape)}"
            )
        return t.to(device=z.device, dtype=z.dtype).reshape((1, -1) + (1,) * (z.dim() - 2))

    def __call__(self, z: Tensor) -> Tensor:
        """ReLU gate values sigma(z), same shape as z, in [0, 1]. Allocates one tensor."""
        if self.is_hard:
            return (z > 0).to(z.dtype)
        if self.is_none:
            return torch.ones_like(z)
        t = self.temperature_like(z)
        u = z / t
        if self.shape == "normal_cdf":
            g = torch.special.ndtr(u)
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
        return f"Gate({self.shape!r}, T={ts}{', detach' if self.detach else ''})"


@dataclass(frozen=True)
class Site:
    """One gated call in one forward pass.

    name: the module path for calls made by an ``nn.ReLU`` / ``nn.MaxPool2d`` module (e.g. ``layer1.0.relu``),
        or ``<module path>:<function>`` for functional calls (e.g. ``features:relu``; ``<root>`` for the model).
    kind: ``relu`` or ``maxpool``.
    call: index of this call among the calls with the same name in this forward (a reused module is called
        several times).
    depth: index of this call among all calls of the same kind in this forward (0 = closest to the input).
    module_type: class name of the innermost module making the call.
    """

    name: str
    kind: Literal["relu", "maxpool"]
    call: int = 0
    depth: int = 0
    module_type: str = ""

    @property
    def key(self) -> str:
        """Unique per forward pass: ``name#call``."""
        return f"{self.name}#{self.call}"


class Schedule:
    """Maps a call site to its gate. Subclasses implement ``rule``."""

    def rule(self, site: Site) -> Gate:
        raise NotImplementedError

    def __call__(self, site: Site) -> Gate:
        return self.rule(site)


def _default_pool_gate(relu: Gate, pool_temperature: Temperature | None, pool_detach: bool) -> Gate:
    if pool_temperature is None:
        if relu.is_hard:
            return Gate("hard", 0.0)
        if relu.is_none:
            return Gate("none", math.inf)
    t = relu.temperature if pool_temperature is None else pool_temperature
    if isinstance(t, Tensor) and t.numel() > 1:
        raise ValueError("per-channel temperatures for max-pool sites come from a PerChannel schedule")
    return Gate("softmax", t, detach=pool_detach)


@dataclass(frozen=True)
class ByType(Schedule):
    """One gate for every ReLU call and one for every max-pool call."""

    relu: Gate = field(default_factory=Gate)
    maxpool: Gate = field(default_factory=lambda: Gate("softmax", 0.3))

    def rule(self, site: Site) -> Gate:
        return self.relu if site.kind == "relu" else self.maxpool


@dataclass(frozen=True)
class ByName(Schedule):
    """Gates chosen by fnmatch patterns on the site name (first match wins), else ``default``.

    rules: {pattern: Gate}, e.g. {"layer4.*": Gate("sigmoid", 0.5), "*maxpool*": Gate("hard")}.
    kind: restrict the patterns to ``relu`` or ``maxpool`` sites (None: both).
    """

    rules: Mapping[str, Gate]
    default: Schedule = field(default_factory=ByType)
    kind: str | None = None

    def rule(self, site: Site) -> Gate:
        if self.kind is None or site.kind == self.kind:
            for pattern, gate in self.rules.items():
                if fnmatch.fnmatchcase(site.name, pattern) or fnmatch.fnmatchcase(site.key, pattern):
                    return gate
        return self.default.rule(site)


@dataclass(frozen=True)
class ByDepth(Schedule):
    """Gates chosen by call depth (order of the call among calls of ``kind`` in the forward pass).

    rules: a sequence (rules[d] for depth d; depths past the end use ``default``), a mapping from an int,
        a ``range`` or a (start, stop) pair to a Gate, or a callable depth -> Gate | None.
    """

    rules: Sequence[Gate] | Mapping[object, Gate] | Callable[[int], Gate | None]
    default: Schedule = field(default_factory=ByType)
    kind: str = "relu"

    def rule(self, site: Site) -> Gate:
        if site.kind == self.kind:
            gate = self._lookup(site.depth)
            if gate is not None:
                return gate
        return self.default.rule(site)

    def _lookup(self, depth: int) -> Gate | None:
        rules = self.rules
        if callable(rules) and not isinstance(rules, (Mapping, Sequence)):
            return rules(depth)
        if isinstance(rules, Sequence):
            return rules[depth] if depth < len(rules) else None
        for key, gate in rules.items():
            if isinstance(key, int) and key == depth:
                return gate
            if isinstance(key, range) and depth in key:
                return gate
            if isinstance(key, tuple) and len(key) == 2 and key[0] <= depth < key[1]:
                return gate
        return None


@dataclass(frozen=True)
class PerChannel(Schedule):
    """Per-channel (per-neuron) temperatures keyed by ``Site.key``, usually from :func:`calibrate`.

    temperatures: {site key: tensor (C,)}; sites without an entry use ``default`` when given, else raise.
    shape: ReLU gate shape; max-pool sites in ``temperatures`` use the softmax pool with their tensor.
    """

    temperatures: Mapping[str, Tensor]
    shape: str = "sigmoid"
    default: Schedule | None = None
    meta: Mapping[str, object] = field(default_factory=dict)

    def rule(self, site: Site) -> Gate:
        t = self.temperatures.get(site.key)
        if t is None:
            if self.default is None:
                raise ValueError(
                    f"per-channel schedule has no temperatures for site {site.key!r}; it was calibrated on "
                    f"another model (it knows {len(self.temperatures)} sites, e.g. {next(iter(self.temperatures), '-')!r})"
                )
            return self.default.rule(site)
        return Gate(self.shape if site.kind == "relu" else "softmax", t)

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as a torch file (tensors on CPU)."""
        torch.save(
            {
                "format": "excitation_pullbacks.PerChannel/1",
                "shape": self.shape,
                "temperatures": {k: v.detach().cpu() for k, v in self.temperatures.items()},
                "meta": dict(self.meta),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, default: Schedule | None = None) -> PerChannel:
        """Read a file written by :meth:`save`."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "excitation_pullbacks.PerChannel/1":
            raise ValueError(f"{path} is not a per-channel schedule file written by PerChannel.save")
        return cls(data["temperatures"], shape=data["shape"], default=default, meta=data.get("meta", {}))


def make_schedule(
    *,
    temperature: Temperature = 0.3,
    gate: str = "sigmoid",
    pool_temperature: Temperature | None = None,
    pool_detach: bool = False,
    schedule: Schedule | None = None,
) -> Schedule:
    """The schedule the keyword arguments of ``excitation``/``pullback`` describe.

    With ``schedule`` given it wins. Otherwise one ReLU gate ``Gate(gate, temperature)`` and a max-pool gate
    at ``pool_temperature`` when given (0: hard max gradient), else following the ReLU gate: hard when it is
    hard (T = 0 gives the exact vanilla gradient), uniform when it is none, else the softmax pool at T.
    """
    _check_temperature(temperature)
    if pool_temperature is not None:
        _check_temperature(pool_temperature)
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        return schedule
    if gate in ("softmax",):
        raise ValueError("'softmax' is a max-pool gate; choose a ReLU gate shape: " + ", ".join(RELU_SHAPES))
    relu = Gate(gate, temperature)
    return ByType(relu=relu, maxpool=_default_pool_gate(relu, pool_temperature, pool_detach))
