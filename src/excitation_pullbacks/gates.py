"""Gate shapes (what multiplies the gradient at one call site) and schedules (which gate where).

A ReLU call site z -> relu(z) keeps its forward value; its backward multiplies the incoming gradient by
``Gate(z)`` instead of the hard gate 1[z > 0]. A max-pool call site keeps the exact max forward; its
backward is the gradient of a softmax pool whose temperature and detach flag come from its ``Gate``.
A SiLU or GELU call site z -> z * s(z) (s = sigmoid, resp. the normal CDF Phi or its tanh approximation)
keeps its forward value; its backward multiplies the gradient by ``Gate(z)`` instead of the exact
derivative s(z) + z s'(z). The shape ``own`` is the activation's own gate s(z / T): at T = 1 the gates are
those of the network, detached, so a bias-free network is f(x) = <pullback(x), x> exactly.

Schedules map a :class:`Site` (one gated call in the forward pass) to a :class:`Gate`. They compose:
``ByName``, ``ByDepth`` and ``PerChannel`` fall back to a ``default`` schedule for sites they do not cover.
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "COMPAT",
    "GATE_OPTIONS",
    "POOL_PADDINGS",
    "POOL_SHAPES",
    "RELU_SHAPES",
    "ByDepth",
    "ByName",
    "ByType",
    "Gate",
    "PerChannel",
    "Schedule",
    "Site",
    "as_schedule",
    "make_schedule",
    "resolve_schedule",
]

RELU_SHAPES = ("sigmoid", "normal_cdf", "normal_cdf_tanh", "softsign", "own", "hard", "none")
POOL_SHAPES = ("softmax", "hard", "none")
POOL_PADDINGS = ("exclude", "zero")
COMPAT = ("default", "author")
#: The keyword shorthands for a schedule that the core functions take beside (or instead of) a Schedule.
GATE_OPTIONS = ("temperature", "gate", "pool_temperature", "pool_detach", "smooth_temperature", "smooth_gate", "compat")
_OWN = {"silu": "sigmoid", "gelu": "normal_cdf", "gelu_tanh": "normal_cdf_tanh"}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_ALIASES = {"phi": "normal_cdf", "ndtr": "normal_cdf", "vanilla": "hard", "identity": "none"}

Temperature = float | Tensor


def _check_temperature(temperature: Temperature) -> None:
    if isinstance(temperature, Tensor):
        if temperature.numel() == 0:
            raise ValueError("temperature tensor is empty")
        if torch.isnan(temperature).any() or (temperature < 0).any():
            raise ValueError("temperature must be >= 0 and not NaN (got a tensor with negative or NaN entries)")
        return
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number or a tensor, got {type(temperature).__name__}")  # noqa: TRY004
    if math.isnan(temperature) or temperature < 0:
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
    temperature: T >= 0; a float, or a tensor of shape (C,) for one temperature per channel (dim 1 of z,
        or the last dim where z comes straight from an nn.Linear, see ``Site.channel_dim``).
        T = 0 is the hard gate (vanilla gradient) for every shape; T = inf is no gating.
    detach: max-pool only; detach the softmax weights (gradient = weights) instead of the paper's full
        gradient of sum_j x_j softmax(x/T)_j.
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
        if shape not in RELU_SHAPES + POOL_SHAPES:
            raise ValueError(f"unknown gate shape {self.shape!r}; choose one of {RELU_SHAPES + ('softmax',)}")
        _check_temperature(self.temperature)
        if self.padding not in POOL_PADDINGS:
            raise ValueError(f"unknown pool padding {self.padding!r}; choose one of {', '.join(POOL_PADDINGS)}")
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


@dataclass(frozen=True)
class Site:
    """One gated call in one forward pass.

    name: the module path for calls made by an ``nn.ReLU`` / ``nn.MaxPool2d`` / ``nn.SiLU`` / ``nn.GELU``
        module (e.g. ``layer1.0.relu``), or ``<module path>:<function>`` for functional calls (e.g.
        ``features:relu``, ``<root>:gelu``; ``<root>`` for the model).
    kind: ``relu``, ``maxpool``, ``silu`` or ``gelu`` (both GELU forms; ``approximate`` tells them apart).
    call: index of this call among the calls with the same name in this forward (a reused module is called
        several times).
    depth: index of this call among all calls of the same kind in this forward (0 = closest to the input).
    module_type: class name of the innermost module making the call.
    channel_dim: the dim of z that per-channel temperatures index: 1, or the last dim when z is the output
        of an ``nn.Linear`` (features-last layouts, e.g. ConvNeXt's (N, H, W, C) MLP blocks).
    approximate: GELU sites: ``none`` (erf) or ``tanh``; ``none`` for other kinds.
    """

    name: str
    kind: Literal["relu", "maxpool", "silu", "gelu"]
    call: int = 0
    depth: int = 0
    module_type: str = ""
    channel_dim: int = 1
    approximate: str = "none"

    @property
    def activation(self) -> str:
        """The kind with GELU's variant: relu, maxpool, silu, gelu or gelu_tanh (what ``Gate.resolve`` takes)."""
        return "gelu_tanh" if self.kind == "gelu" and self.approximate == "tanh" else self.kind

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


def _default_pool_gate(relu: Gate, pool_temperature: Temperature | None, pool_detach: bool, padding: str) -> Gate:
    if pool_temperature is None:
        if relu.is_hard:
            return Gate("hard", 0.0)
        if relu.is_none:
            return Gate("none", math.inf, padding=padding)
    t = relu.temperature if pool_temperature is None else pool_temperature
    if isinstance(t, Tensor) and t.numel() > 1:
        raise ValueError("per-channel temperatures for max-pool sites come from a PerChannel schedule")
    return Gate("softmax", t, detach=pool_detach, padding=padding)


def _default_smooth_gate(relu: Gate, smooth_temperature: Temperature | None, smooth_gate: str) -> Gate:
    if smooth_temperature is None:
        if relu.is_hard:
            return Gate("hard", 0.0)
        if relu.is_none:
            return Gate("none", math.inf)
    return Gate(smooth_gate, relu.temperature if smooth_temperature is None else smooth_temperature)


@dataclass(frozen=True)
class ByType(Schedule):
    """One gate per kind of call: ReLU, max-pool, SiLU and GELU (``own``: sigmoid(z/T), resp. Phi(z/T))."""

    relu: Gate = field(default_factory=Gate)
    maxpool: Gate = field(default_factory=lambda: Gate("softmax", 0.3))
    silu: Gate = field(default_factory=lambda: Gate("own", 0.3))
    gelu: Gate = field(default_factory=lambda: Gate("own", 0.3))

    def rule(self, site: Site) -> Gate:
        return getattr(self, site.kind)

    @property
    def is_hard(self) -> bool:
        """True when every kind's gate is hard: the schedule gives the vanilla gradient, native ops only."""
        gates = {"relu": self.relu, "maxpool": self.maxpool, "silu": self.silu, "gelu": self.gelu}
        return all(g.resolve(kind).is_hard for kind, g in gates.items())


@dataclass(frozen=True)
class ByName(Schedule):
    """Gates chosen by fnmatch patterns on the site name (first match wins), else ``default``.

    rules: {pattern: Gate}, e.g. {"layer4.*": Gate("sigmoid", 0.5), "*maxpool*": Gate("hard")}.
    kind: restrict the patterns to sites of one kind (``relu``, ``maxpool``, ``silu``, ``gelu``; None: all).
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
    shape: ReLU gate shape; max-pool sites in ``temperatures`` use the softmax pool with their tensor, SiLU and
        GELU sites their own gate (shape ``own``).
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
                    f"another model (it knows {len(self.temperatures)} sites, e.g. "
                    f"{next(iter(self.temperatures), '-')!r})"
                )
            return self.default.rule(site)
        shape = {"relu": self.shape, "maxpool": "softmax"}.get(site.kind, "own")
        return Gate(shape, t)

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
    pool_detach: bool | None = None,
    smooth_temperature: Temperature | None = None,
    smooth_gate: str = "own",
    compat: str = "default",
    schedule: Schedule | None = None,
) -> Schedule:
    """The schedule the gate keywords describe (see :func:`as_schedule` for how core functions take them).

    One ReLU gate ``Gate(gate, temperature)``; a max-pool gate at ``pool_temperature`` when given (0: hard
    max gradient), else following the ReLU gate: hard when it is hard (T = 0 gives the exact vanilla
    gradient) or ``own``, uniform when it is none, else the softmax pool at T, its weights detached with
    ``pool_detach``; and one gate ``Gate(smooth_gate, smooth_temperature)`` at SiLU and GELU sites when
    ``smooth_temperature`` is given (0: their exact derivative; 1 with ``own``: the network's own gates,
    detached), else following the ReLU gate: native derivative when it is hard, 1 when it is none, else
    ``smooth_gate`` at T (default ``own``: sigmoid(z/T) at SiLU, Phi(z/T) at GELU).

    compat: ``default``, or ``author`` for the paper author's published implementation, which differs in
        three places. Its soft max-pool is an unfold over the zero-padded input, so the padding takes part
        in the softmax (``Gate.padding="zero"``). It swaps ``nn.ReLU`` / ``nn.MaxPool2d`` modules, so
        functional ReLU and max-pool calls (sites named ``<module>:<function>``, e.g. DenseNet's ``F.relu``
        in ``DenseNet.forward``: ``backbone:relu`` behind ImageNetInput) keep the hard gate. And its later
        code detaches the softmax weights (the design notes: the paper's Listing 2 differentiates through
        them, the author's later code does not); we follow the later code, the one published with the
        method, so ``author`` sets ``pool_detach=True`` unless ``pool_detach`` is given
        (``pool_detach=False``: Listing 2 exactly).
    schedule: deprecated spelling of :func:`as_schedule`'s first argument; when given it wins.
    """
    _check_temperature(temperature)
    if pool_temperature is not None:
        _check_temperature(pool_temperature)
    if smooth_temperature is not None:
        _check_temperature(smooth_temperature)
    if compat not in COMPAT:
        raise ValueError(f"unknown compat {compat!r}; choose one of {', '.join(COMPAT)}")
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        return schedule
    for shape in (gate, smooth_gate):
        if shape in ("softmax",):
            raise ValueError("'softmax' is a max-pool gate; choose a ReLU gate shape: " + ", ".join(RELU_SHAPES))
    author = compat == "author"
    detach = bool(author if pool_detach is None else pool_detach)
    relu = Gate(gate, temperature)
    pool = (
        Gate("hard", 0.0)
        if relu.shape == "own" and pool_temperature is None
        else (_default_pool_gate(relu, pool_temperature, detach, "zero" if author else "exclude"))
    )
    smooth = _default_smooth_gate(relu, smooth_temperature, smooth_gate)
    by_type = ByType(relu=relu, maxpool=pool, silu=smooth, gelu=smooth)
    if not author:
        return by_type
    hard = Gate("hard", 0.0)
    functional_hard = ByName({"*:*": hard}, default=by_type, kind="maxpool")
    return ByName({"*:*": hard}, default=functional_hard, kind="relu")


def as_schedule(schedule: Schedule | float | Tensor | None = None, /, **options) -> Schedule:
    """The one schedule argument of the core functions, as a :class:`Schedule`.

    This is the convention of ``pullback``, ``ascent``, ``excitation`` / ``Excitation``, ``path_kernel``,
    ``ExcitationPullback`` and ``explainer``: they take ``schedule`` (positionally or by name) and, instead
    of it, the keyword shorthands ``temperature, gate, pool_temperature, pool_detach, smooth_temperature,
    smooth_gate, compat`` of :func:`make_schedule`.

    schedule: a Schedule (returned as it is); a number T or a 0-dim tensor (the default sigmoid gate at T:
        ``make_schedule(temperature=T)``); or None (``make_schedule(**options)``, i.e. sigmoid at T = 0.3
        without options).
    options: the shorthands above, only with ``schedule=None`` (with a Schedule they are a ValueError, with
        a number ``temperature`` is; an unknown keyword is a TypeError naming the allowed ones).
    """
    unknown = sorted(set(options) - set(GATE_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected gate keyword(s) {', '.join(unknown)}; the schedule shorthands are {', '.join(GATE_OPTIONS)}"
        )
    if schedule is None:
        return make_schedule(**options)
    if isinstance(schedule, Schedule):
        if options:
            raise ValueError(f"give either a Schedule or the gate keywords ({', '.join(sorted(options))}), not both")
        return schedule
    if isinstance(schedule, bool) or not isinstance(schedule, (int, float, Tensor)):
        raise TypeError(f"schedule must be a Schedule, a temperature (a number) or None, got {type(schedule).__name__}")
    if isinstance(schedule, Tensor) and schedule.dim() != 0:
        raise TypeError(
            "a tensor schedule must be a 0-dim temperature; per-channel temperatures come from a PerChannel schedule"
        )
    if "temperature" in options:
        raise ValueError("give the temperature either as the schedule argument or as temperature=, not both")
    return make_schedule(temperature=schedule, **options)


def resolve_schedule(schedule: Schedule | float | Tensor | None, gate: Mapping[str, object]) -> Schedule:
    """:func:`as_schedule` ``(schedule, **gate)`` as the core functions call it, with one concession to
    earlier code: a Schedule together with gate keywords meant "the Schedule wins" (it still does, with a
    DeprecationWarning) where :func:`as_schedule` itself refuses the combination."""
    if isinstance(schedule, Schedule) and gate:
        as_schedule(**gate)  # unknown or invalid keywords are still errors
        warnings.warn(
            f"gate keywords ({', '.join(sorted(gate))}) beside a Schedule are ignored; pass one or the other",
            DeprecationWarning,
            stacklevel=3,
        )
        return schedule
    return as_schedule(schedule, **gate)
