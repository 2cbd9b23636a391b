"""Schedules: which gate at which call site.

A schedule maps a :class:`~excitation_pullbacks.sites.Site` (one gated call in the forward pass) to a
:class:`~excitation_pullbacks.gates.Gate`. They compose: ``ByName``, ``ByDepth`` and ``PerChannel`` fall back
to a ``default`` schedule for sites they do not cover; ``ByType`` is the usual leaf.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .gates import Gate
from .saving import save_atomic
from .sites import Site

__all__ = ["PER_CHANNEL_KINDS", "ByDepth", "ByName", "ByType", "PerChannel", "Schedule"]

#: Site kinds with per-channel temperatures (what ``calibrate`` measures and ``PerChannel`` requires).
PER_CHANNEL_KINDS = frozenset({"relu", "maxpool", "silu", "gelu"})


class Schedule:
    """Maps a call site to its gate. Subclasses implement ``rule``."""

    def rule(self, site: Site) -> Gate:
        raise NotImplementedError

    def __call__(self, site: Site) -> Gate:
        return self.rule(site)


_HARD = Gate("hard", 0.0)


@dataclass(frozen=True)
class ByType(Schedule):
    """One gate per kind of call: ReLU, max-pool, SiLU and GELU (``own``: sigmoid(z/T), resp. Phi(z/T)),
    normalisation (``norm``: LayerNorm and GroupNorm) and attention; ``other``: {kind: Gate} for the
    kinds of registered rules. Kinds without a gate keep their exact gradient (the hard gate)."""

    relu: Gate = field(default_factory=Gate)
    maxpool: Gate = field(default_factory=lambda: Gate("softmax", 0.3))
    silu: Gate = field(default_factory=lambda: Gate("own", 0.3))
    gelu: Gate = field(default_factory=lambda: Gate("own", 0.3))
    norm: Gate = _HARD
    attention: Gate = _HARD
    other: Mapping[str, Gate] = field(default_factory=dict)

    def rule(self, site: Site) -> Gate:
        gate = getattr(self, site.kind, None) if site.kind in _KINDS else self.other.get(site.kind)
        return _HARD if gate is None else gate

    @property
    def is_hard(self) -> bool:
        """True when every kind's gate is hard: the schedule gives the vanilla gradient, native ops only."""
        gates = [(kind, getattr(self, kind)) for kind in _KINDS] + list(self.other.items())
        return all(g.resolve(kind).is_hard for kind, g in gates)


_KINDS = ("relu", "maxpool", "silu", "gelu", "norm", "attention")


@dataclass(frozen=True)
class ByName(Schedule):
    """Gates chosen by fnmatch patterns on the site name (first match wins), else ``default``.

    rules: {pattern: Gate}, e.g. {"layer4.*": Gate("sigmoid", 0.5), "*maxpool*": Gate("hard")}.
    kind: restrict the patterns to sites of one kind (``relu``, ``maxpool``, ``silu``, ``gelu``, ...; None: all).
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

    temperatures: {site key: tensor (C,)}; ReLU, max-pool, SiLU and GELU sites without an entry use ``default``
        when given, else raise; other sites (norms, attention) use ``default``, else their exact gradient.
    shape: ReLU gate shape; max-pool sites in ``temperatures`` use the softmax pool with their tensor, SiLU and
        GELU sites their own gate (shape ``own``).
    """

    temperatures: Mapping[str, Tensor]
    shape: str = "sigmoid"
    default: Schedule | None = None
    meta: Mapping[str, object] = field(default_factory=dict)

    def rule(self, site: Site) -> Gate:
        t = self.temperatures.get(site.key)
        if t is None and site.kind not in PER_CHANNEL_KINDS:  # no per-channel T: not calibrated
            return _HARD if self.default is None else self.default.rule(site)
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
        """Write the schedule as a torch file (tensors on CPU), atomically (:func:`~.saving.save_atomic`)."""
        save_atomic(
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
