"""``GateOptions``: the one type for "which gate shapes at which temperatures", and its named presets.

Every front door uses it: the core functions' keyword shorthands (``pullback(model, x, t, temperature=0.5)``
builds ``GateOptions(temperature=0.5)``), the pipeline's ``gate=`` config group (its structured config has the
same fields) and the explorer's gate panel. Its values are validated once, when it is made, and
:meth:`GateOptions.schedule` gives the :class:`~excitation_pullbacks.schedules.Schedule` the engine reads.

Presets, one per published code, each tested against an independent re-implementation of that code's rules:
``paper`` (this project's defaults for the ReLU paper), ``vanilla`` (the plain input gradient), ``author`` (the ReLU paper's published code,
ExcitationPullbacks), ``semantic`` (the deep-network method's defaults: "Pulling Back the Curtain on Deep
Networks") and ``semantic_author`` (its published code, SemanticPullbacks, quirks included).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from torch import Tensor

from .gates import NORM_SHAPES, RELU_SHAPES, Gate, Temperature, check_temperature
from .schedules import ByName, ByType, Schedule
from .sites import Site

__all__ = [
    "COMPAT",
    "GATE_OPTIONS",
    "PRESETS",
    "GateOptions",
    "as_schedule",
    "make_schedule",
    "preset",
    "resolve_schedule",
]

#: ``default``; ``author``: the ReLU paper's code; ``semantic_author``: the deep-network paper's code.
COMPAT = ("default", "author", "semantic_author")
_HARD = Gate("hard", 0.0)


@dataclass(frozen=True)
class GateOptions:
    """Gate shapes and temperatures by kind of call site, validated when made.

    temperature, gate: ReLU sites get ``Gate(gate, temperature)`` (sigmoid(z / 0.3) by default).
    pool_temperature: max-pool sites' softmax-pool T (0: the exact max gradient); None follows the ReLU gate:
        hard when it is hard or ``own``, uniform when it is none, else the softmax pool at ``temperature``.
    pool_detach: detach the softmax-pool weights (None: no, except ``compat="semantic_author"``).
    smooth_temperature, smooth_gate: SiLU and GELU sites get ``Gate(smooth_gate, smooth_temperature)``
        (``own``: sigmoid(z / T) at SiLU, Phi(z / T) at GELU; 0: their exact derivative); None follows the
        ReLU gate (native when it is hard, 1 when it is none, else ``smooth_gate`` at ``temperature``).
    silu_temperature, gelu_temperature: override ``smooth_temperature`` for one of the two.
    norm: LayerNorm / GroupNorm sites: ``hard`` (exact gradient) or ``frozen`` (mean and variance constant).
    attention_temperature: attention sites: None (exact gradient) or T of the softened attention
        softmax(q k^T * scale / T) in the backward; attention_detach: through the values only.
    compat: ``default``; ``author``: the ReLU paper's published code (ExcitationPullbacks) - its soft max-pool
        is an unfold over the zero-padded input, so the padding takes part in the softmax
        (``Gate.padding="zero"``), and it swaps ``nn.ReLU`` / ``nn.MaxPool2d`` modules, so functional calls
        (sites named ``<module>:<function>``, e.g. DenseNet's ``F.relu`` in ``DenseNet.forward``) keep the
        hard gate; ``semantic_author``: the deep-network paper's code (SemanticPullbacks) - the same two
        quirks for every kind, softmax-pool weights detached, and timm PVT's attention through the values
        only while ``nn.MultiheadAttention`` goes through queries, keys and values.
    """

    temperature: Temperature = 0.3
    gate: str = "sigmoid"
    pool_temperature: Temperature | None = None
    pool_detach: bool | None = None
    smooth_temperature: Temperature | None = None
    smooth_gate: str = "own"
    silu_temperature: Temperature | None = None
    gelu_temperature: Temperature | None = None
    norm: str = "hard"
    attention_temperature: Temperature | None = None
    attention_detach: bool = False
    compat: str = "default"

    def __post_init__(self) -> None:
        others = (
            "pool_temperature",
            "smooth_temperature",
            "silu_temperature",
            "gelu_temperature",
            "attention_temperature",
        )
        for name in others:  # ``temperature`` is checked by the ReLU gate below
            value = getattr(self, name)
            if value is not None:
                check_temperature(value)
        for shape in (self.gate, self.smooth_gate):
            if shape == "softmax":
                raise ValueError("'softmax' is a max-pool gate; choose a ReLU gate shape: " + ", ".join(RELU_SHAPES))
        Gate(self.gate, self.temperature)  # unknown shapes fail here
        Gate(self.smooth_gate)
        if self.norm not in NORM_SHAPES:
            raise ValueError(f"unknown norm gate {self.norm!r}; choose one of {', '.join(NORM_SHAPES)}")
        if self.compat not in COMPAT:
            raise ValueError(f"unknown compat {self.compat!r}; choose one of {', '.join(COMPAT)}")

    def replace(self, **changes) -> GateOptions:
        """A copy with ``changes`` (validated)."""
        return replace(self, **changes)

    def schedule(self) -> Schedule:
        """The schedule these options describe."""
        author = self.compat in ("author", "semantic_author")
        detach = bool(self.compat == "semantic_author" if self.pool_detach is None else self.pool_detach)
        relu = Gate(self.gate, self.temperature)
        if relu.shape == "own" and self.pool_temperature is None:
            pool = _HARD
        else:
            pool = _pool_gate(relu, self.pool_temperature, detach, "zero" if author else "exclude")
        silu = _smooth_gate(relu, _first(self.silu_temperature, self.smooth_temperature), self.smooth_gate)
        gelu = _smooth_gate(relu, _first(self.gelu_temperature, self.smooth_temperature), self.smooth_gate)
        norm = Gate(self.norm, 0.0 if self.norm == "hard" else 1.0)
        t = self.attention_temperature
        attention = _HARD if t is None else Gate("softmax", t, detach=self.attention_detach)
        by_type = ByType(relu=relu, maxpool=pool, silu=silu, gelu=gelu, norm=norm, attention=attention)
        if self.compat == "author":
            functional_hard = ByName({"*:*": _HARD}, default=by_type, kind="maxpool")
            return ByName({"*:*": _HARD}, default=functional_hard, kind="relu")
        if self.compat == "semantic_author":
            return ModuleCalls(by_type, attention_detach_types=(_PVT_ATTENTION,))
        return by_type


#: timm's PVT v2 attention, which the deep-network paper's code pulls back through the values only.
_PVT_ATTENTION = "timm.models.pvt_v2.Attention"


@dataclass(frozen=True)
class ModuleCalls(Schedule):
    """``default``'s gates at calls made by modules of the rule's type, the hard gate at functional calls
    (sites named ``<module>:<function>``), as a module-swapping implementation gates a model; attention calls
    of the module classes in ``attention_detach_types`` (``module.qualname``) go through the values only."""

    default: Schedule
    attention_detach_types: tuple[str, ...] = ()

    def rule(self, site: Site) -> Gate:
        if site.kind == "attention" and site.module_class in self.attention_detach_types:
            gate = self.default.rule(site)
            return gate if gate.is_hard else replace(gate, detach=True)
        if ":" in site.name:
            return _HARD
        return self.default.rule(site)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _pool_gate(relu: Gate, pool_temperature: Temperature | None, pool_detach: bool, padding: str) -> Gate:
    if pool_temperature is None:
        if relu.is_hard:
            return _HARD
        if relu.is_none:
            return Gate("none", math.inf, padding=padding)
    t = relu.temperature if pool_temperature is None else pool_temperature
    if isinstance(t, Tensor) and t.numel() > 1:
        raise ValueError("per-channel temperatures for max-pool sites come from a PerChannel schedule")
    return Gate("softmax", t, detach=pool_detach, padding=padding)


def _smooth_gate(relu: Gate, smooth_temperature: Temperature | None, smooth_gate: str) -> Gate:
    if smooth_temperature is None:
        if relu.is_hard:
            return _HARD
        if relu.is_none:
            return Gate("none", math.inf)
    return Gate(smooth_gate, relu.temperature if smooth_temperature is None else smooth_temperature)


#: The keyword shorthands for a schedule that the core functions take beside (or instead of) a Schedule.
GATE_OPTIONS = tuple(f.name for f in fields(GateOptions))

#: Named presets (``gate=<name>`` in the pipeline, ``preset(name)`` in code).
PRESETS: dict[str, GateOptions] = {
    "paper": GateOptions(),
    "author": GateOptions(compat="author"),
    "semantic": GateOptions(
        gate="normal_cdf",
        temperature=0.6,
        pool_temperature=0.3,
        pool_detach=True,
        silu_temperature=1.6,
        gelu_temperature=1.0,
        norm="frozen",
        attention_temperature=1.0,
    ),
}
PRESETS["semantic_author"] = PRESETS["semantic"].replace(compat="semantic_author")
#: The vanilla gradient: hard gates everywhere (native ops only, bit for bit the autograd input gradient).
PRESETS["vanilla"] = GateOptions(temperature=0.0, gate="hard")


def preset(name: str, **changes) -> GateOptions:
    """The preset ``name`` (see :data:`PRESETS`) with ``changes``."""
    if name not in PRESETS:
        raise ValueError(f"unknown gate preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes)


def make_schedule(**options) -> Schedule:
    """``GateOptions(**options).schedule()``: the schedule the gate keywords describe."""
    return GateOptions(**options).schedule()


def as_schedule(schedule: Schedule | GateOptions | float | Tensor | None = None, /, **options) -> Schedule:
    """The one schedule argument of the core functions, as a :class:`Schedule`.

    This is the convention of ``pullback``, ``ascent``, ``excitation`` / ``Excitation``, ``path_kernel``,
    ``ExcitationPullback`` and ``explainer``: they take ``schedule`` (positionally or by name) and, instead
    of it, the keyword shorthands of :class:`GateOptions` (``temperature, gate, pool_temperature, ...``).

    schedule: a Schedule (returned as it is); GateOptions (their schedule); a number T or a 0-dim tensor
        (``GateOptions(temperature=T)``); or None (``GateOptions(**options)``, sigmoid at T = 0.3 without
        options).
    options: the shorthands above, only with ``schedule=None`` or a number (with a Schedule they are a
        ValueError, with a number ``temperature`` is; an unknown keyword is a TypeError naming the allowed ones).
    """
    unknown = sorted(set(options) - set(GATE_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected gate keyword(s) {', '.join(unknown)}; the schedule shorthands are {', '.join(GATE_OPTIONS)}"
        )
    if schedule is None:
        return make_schedule(**options)
    if isinstance(schedule, (Schedule, GateOptions)):
        if options:
            raise ValueError(f"give either a Schedule or the gate keywords ({', '.join(sorted(options))}), not both")
        return schedule.schedule() if isinstance(schedule, GateOptions) else schedule
    if isinstance(schedule, bool) or not isinstance(schedule, (int, float, Tensor)):
        raise TypeError(f"schedule must be a Schedule, a temperature (a number) or None, got {type(schedule).__name__}")
    if isinstance(schedule, Tensor) and schedule.dim() != 0:
        raise TypeError(
            "a tensor schedule must be a 0-dim temperature; per-channel temperatures come from a PerChannel schedule"
        )
    if "temperature" in options:
        raise ValueError("give the temperature either as the schedule argument or as temperature=, not both")
    return make_schedule(temperature=schedule, **options)


def resolve_schedule(schedule: Schedule | GateOptions | float | Tensor | None, gate: Mapping[str, object]) -> Schedule:
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
