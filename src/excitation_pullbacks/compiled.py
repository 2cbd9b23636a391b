"""Models wrapped by ``torch.compile``.

``torch.compile(model)`` returns a wrapper module whose submodules live under ``_orig_mod``. The engine gates
the wrapped model through the original module (its hooks and site names are the original's, so schedules,
neuron targets and calibrated temperatures carry over unchanged) and, while it is open, routes the wrapper's
calls through :func:`gated_call`: a function compiled with the wrapper's own options whose compiled graphs
are cached apart from the wrapper's, so that a graph traced without the engine (torch.compile does not
guard on module hooks) is never replayed inside it, nor one traced with the engine outside it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager
from types import CodeType

import torch
from torch import nn

__all__ = ["CompiledRoute", "gated_call", "is_compiled", "unwrap_compiled"]

_wrapper: type | None = None
#: {original module: {tag: code object}}: each model's own code for its gated calls (see :func:`gated_call`)
_CODES: weakref.WeakKeyDictionary[nn.Module, dict[str, CodeType]] = weakref.WeakKeyDictionary()
_made = 0


def _wrapper_type() -> type:
    """The class of the wrapper ``torch.compile`` returns for a module, read from torch.compile itself (it
    compiles nothing until the wrapper is called)."""
    global _wrapper
    if _wrapper is None:
        _wrapper = type(torch.compile(nn.Identity()))
    return _wrapper


def is_compiled(model: nn.Module) -> bool:
    """True for the module ``torch.compile(model)`` returns."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) and isinstance(model, _wrapper_type())


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module behind ``torch.compile`` wrappers (nested ones too); any other module as it is."""
    while is_compiled(model):
        model = model._orig_mod
    return model


def gated_call(model: nn.Module, tag: str = "") -> Callable:
    """``model``'s original module called through its own compiled function, compiled with the options of
    ``torch.compile(model)`` (the default ones when they cannot be read). Its graphs trace the module's
    hooks and the engine's gating as they are when it first runs; ``tag`` "neuron" gives a separate
    function (separate graphs) for calls that also hook one layer.

    torch.compile caches graphs per code object, and recompiles one at most ``recompile_limit`` times before it
    runs it uncompiled, and remembers which sizes and numbers changed between compiles per code name: each model
    and tag gets a code object and name of its own (made once, kept while the model lives), so that models
    compiled side by side (at one or two batch sizes each) share neither."""
    root = unwrap_compiled(model)

    def call(*args, **kwargs):
        return root(*args, **kwargs)

    codes = _CODES.setdefault(root, {})
    if tag not in codes:  # a new code object (an empty graph cache) and name (torch.compile's dynamic-shape memory)
        global _made
        _made += 1
        name = f"gated_call_{_made}"
        codes[tag] = call.__code__.replace(co_name=name)
    call.__code__ = codes[tag]
    options = getattr(model, "dynamo_ctx", None)
    return options(call) if callable(options) else torch.compile(call)


class CompiledRoute:
    """While open, routes a compiled wrapper's calls through :func:`gated_call` (nothing for other models).

    tag: "" or a name for calls that differ in what they trace (e.g. "neuron" while a forward hook reads one
    layer): each tag gets its own compiled function, so its graphs are cached apart (see :meth:`tagged`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled = is_compiled(model)
        self.tag = ""
        self._forward = None

    def open(self) -> None:
        if self.compiled:
            self._forward = self.model.__dict__.get("forward")
            self.model.forward = gated_call(self.model, self.tag)

    def close(self) -> None:
        if self.compiled and "forward" in self.model.__dict__:
            if self._forward is None:
                del self.model.forward
            else:
                self.model.forward = self._forward
            self._forward = None

    @contextmanager
    def tagged(self, tag: str):
        """Calls inside the block use the graphs of ``tag``."""
        previous, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = previous
