"""``Site``: one gated call in one forward pass, what a schedule chooses a gate for."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Site"]


@dataclass(frozen=True)
class Site:
    """One gated call in one forward pass.

    name: the module path for calls made by a module of the rule's own type (``nn.ReLU``, ``nn.MaxPool2d``,
        ``nn.LayerNorm``, ``nn.MultiheadAttention``, ...; e.g. ``layer1.0.relu``), or
        ``<module path>:<function>`` for functional calls (e.g. ``features:relu``, ``<root>:gelu``;
        ``<root>`` for the model).
    kind: the rule's kind: ``relu``, ``maxpool``, ``silu``, ``gelu`` (both GELU forms; ``approximate`` tells
        them apart), ``norm`` (LayerNorm, GroupNorm), ``attention``, or a registered rule's own.
    call: index of this call among the calls with the same name in this forward (a reused module is called
        several times).
    depth: index of this call among all calls of the same kind in this forward (0 = closest to the input).
    module_type: class name of the innermost module making the call.
    module_class: its ``module.qualname`` (e.g. ``timm.models.pvt_v2.Attention``).
    channel_dim: the dim of z that per-channel temperatures index: 1, or the last dim when z is the output
        of an ``nn.Linear`` (features-last layouts, e.g. ConvNeXt's (N, H, W, C) MLP blocks).
    approximate: GELU sites: ``none`` (erf) or ``tanh``; ``none`` for other kinds.
    """

    name: str
    kind: str
    call: int = 0
    depth: int = 0
    module_type: str = ""
    channel_dim: int = 1
    approximate: str = "none"
    module_class: str = ""

    @property
    def activation(self) -> str:
        """The kind with GELU's variant: relu, maxpool, silu, gelu or gelu_tanh (what ``Gate.resolve`` takes)."""
        return "gelu_tanh" if self.kind == "gelu" and self.approximate == "tanh" else self.kind

    @property
    def key(self) -> str:
        """Unique per forward pass: ``name#call``."""
        return f"{self.name}#{self.call}"
