"""Models wrapped by ``torch.compile``.

``torch.compile(model)`` returns a wrapper module whose submodules live under ``_orig_mod``. The engine gates
the wrapped model through the original module (its hooks and site names are the original's, so schedules,
neuron targets and calibrated temperatures carry over unchanged) and, while it is open, routes the wrapper's
calls through :func:`gated_call`: a function compiled with the wrapper's own options whose compiled graphs
are cached apart from the wrapper's, so that a graph traced without the engine (torch.compile does not
guard on module hooks) is never replayed inside it, nor one traced with the engine outside it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["gated_call", "is_compiled", "unwrap_compiled"]


def is_compiled(model: nn.Module) -> bool:
    """True for the module ``torch.compile(model)`` returns."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module behind ``torch.compile`` wrappers (nested ones too); any other module as it is."""
    while is_compiled(model):
        model = model._orig_mod
    return model


def gated_call(model: nn.Module, tag: str = "") -> Callable:
    """``model``'s original module called through its own compiled function, compiled with the options of
    ``torch.compile(model)`` (the default ones when they cannot be read). Its graphs trace the module's
    hooks and the engine's gating as they are when it first runs; ``tag`` "neuron" gives a separate
    function (separate graphs) for calls that also hook one layer."""
    root = unwrap_compiled(model)

    def call(*args, **kwargs):
        return root(*args, **kwargs)

    def neuron_call(*args, **kwargs):
        return root(*args, **kwargs)

    fn = neuron_call if tag == "neuron" else call
    options = getattr(model, "dynamo_ctx", None)
    return options(fn) if callable(options) else torch.compile(fn)
