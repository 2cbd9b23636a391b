"""``Rule``: what to do at one kind of call site, and ``Call``: one intercepted torch call, bound by name.

A rule names the torch callables it handles (``F.relu``, ``Tensor.relu_``, ...), the module types whose calls
are named by the module's path, and gives the forward-exact, backward-soft replacement of a call. The gating
context (:mod:`~excitation_pullbacks.gating`) knows no op by name: it looks the callable up in the registry
(:mod:`~excitation_pullbacks.rules.registry`) and hands the rule the call, its site and its gate.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..gates import Gate
from ..sites import Site

__all__ = ["Binder", "Call", "Rule", "binder", "signature"]

_SIGNATURES: dict[Callable, inspect.Signature] = {}
_BINDERS: dict[Callable, Binder] = {}


def signature(func: Callable, stub: Callable | None = None) -> inspect.Signature:
    """The call signature of ``func``: its own where Python knows it, else ``stub``'s (a plain function with
    the documented parameters of a builtin such as ``torch.relu(input)``). Cached per callable."""
    sig = _SIGNATURES.get(func)
    if sig is None:
        try:
            sig = inspect.signature(func)
            params = list(sig.parameters.values())
            if stub is not None and any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
                sig = inspect.signature(stub)  # a dispatcher (*args, **kwargs): the stub says more
        except (TypeError, ValueError):
            if stub is None:
                raise
            sig = inspect.signature(stub)
        _SIGNATURES[func] = sig
    return sig


_POSITIONAL_ONLY, _VAR_POSITIONAL, _KEYWORD_ONLY, _VAR_KEYWORD = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY,
    inspect.Parameter.VAR_KEYWORD,
)


class Binder:
    """Maps a call's ``args`` / ``kwargs`` to {parameter name: value} for one signature, defaults included, as
    ``inspect.Signature.bind`` + ``apply_defaults`` do (same steps, same TypeError for a bad call), in plain tuple
    and dict operations that ``torch.compile`` traces without a graph break (``Signature.bind`` reads a
    mappingproxy, which Dynamo refuses once a dict has changed). Built once per signature by :func:`binder`."""

    __slots__ = ("params",)

    def __init__(self, sig: inspect.Signature):
        #: (name, kind, has a default, default) per parameter, in signature order
        self.params = tuple(
            (p.name, p.kind, p.default is not inspect.Parameter.empty, p.default) for p in sig.parameters.values()
        )

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """{parameter name: value} in signature order (``*args`` a tuple, ``**kwargs`` a dict); TypeError for a
        call the signature does not accept."""
        params, kwargs, n = self.params, dict(kwargs), len(args)
        arguments = {}
        start = len(params)  # the first parameter left to the keywords
        for i, (name, kind, has_default, _) in enumerate(params):
            if i < n:  # a positional argument for this parameter
                if kind in (_KEYWORD_ONLY, _VAR_KEYWORD):
                    raise TypeError("too many positional arguments")
                if kind == _VAR_POSITIONAL:
                    arguments[name] = tuple(args[i:])
                    start = i + 1
                    break
                if name in kwargs and kind != _POSITIONAL_ONLY:
                    raise TypeError(f"multiple values for argument {name!r}")
                arguments[name] = args[i]
                continue
            if kind == _VAR_POSITIONAL:
                start = i + 1
                break
            if name in kwargs:
                if kind == _POSITIONAL_ONLY:
                    raise TypeError(f"{name!r} parameter is positional only, but was passed as a keyword")
                start = i
                break
            if kind == _VAR_KEYWORD or has_default:
                start = i
                break
            raise TypeError(f"missing a required argument: {name!r}")
        else:
            if n > len(params):
                raise TypeError("too many positional arguments")
        var_keyword = None
        for name, kind, has_default, _ in params[start:]:
            if kind == _VAR_KEYWORD:
                var_keyword = name
            elif kind != _VAR_POSITIONAL:
                if name in kwargs:
                    if kind == _POSITIONAL_ONLY:
                        raise TypeError(f"{name!r} parameter is positional only, but was passed as a keyword")
                    arguments[name] = kwargs.pop(name)
                elif not has_default:
                    raise TypeError(f"missing a required argument: {name!r}")
        if kwargs:
            if var_keyword is None:
                raise TypeError(f"got an unexpected keyword argument {next(iter(kwargs))!r}")
            arguments[var_keyword] = kwargs
        bound = {}
        for name, kind, has_default, default in params:  # apply_defaults: every parameter, in signature order
            if name in arguments:
                bound[name] = arguments[name]
            elif has_default:
                bound[name] = default
            else:
                bound[name] = () if kind == _VAR_POSITIONAL else {}
        return bound


def binder(func: Callable, stub: Callable | None = None) -> Binder:
    """The :class:`Binder` of ``func``'s :func:`signature` (``stub``: as there). Cached per callable; the
    registry and the gating context build it before any compiled graph traces a call."""
    b = _BINDERS.get(func)
    if b is None:
        b = _BINDERS[func] = Binder(signature(func, stub))
    return b


@dataclass
class Call:
    """One call of ``func`` with ``args`` / ``kwargs`` as the model made it; ``bound`` maps each parameter
    name of ``func``'s signature to its value (defaults included)."""

    func: Callable
    args: tuple
    kwargs: Mapping[str, Any]
    bound: Mapping[str, Any]

    @classmethod
    def bind(cls, func: Callable, args: tuple, kwargs: Mapping[str, Any], stub: Callable | None = None) -> Call:
        return cls(func, args, kwargs, binder(func, stub).bind(args, kwargs))

    def __getitem__(self, name: str) -> Any:
        return self.bound[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bound.get(name, default)

    def run(self) -> Any:
        """The call exactly as the model made it (the native op, in place if it was)."""
        return self.func(*self.args, **self.kwargs)


class Rule:
    """One kind of call site. Subclasses set the class attributes and implement :meth:`apply`.

    kind: the site kind schedules choose gates by (``relu``, ``layer_norm``, ...).
    functions: {torch callable: signature stub or None}: the calls this rule handles.
    modules: module types whose calls are named by the module path (else ``<path>:<name>``).
    name: the function name in site names of functional calls.
    """

    kind: ClassVar[str] = ""
    functions: ClassVar[Mapping[Callable, Callable | None]] = {}
    modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    name: ClassVar[str] = ""

    def bind(self, func: Callable, args: tuple, kwargs: Mapping[str, Any]) -> Call:
        return Call.bind(func, args, kwargs, self.functions.get(func))

    def prepare(self) -> None:
        """Work done once before a compiled graph traces this rule's calls (e.g. loading a native library),
        which a traced region cannot do without a graph break. Called when a context opens on a compiled
        model."""

    def handles(self, call: Call) -> bool:
        """False for calls this rule leaves alone (they run natively and make no site)."""
        return True

    def input(self, call: Call) -> Tensor:
        """The tensor the gate reads (z): what observers and substitutes see."""
        return call.bound["input"]

    def details(self, call: Call) -> dict[str, Any]:
        """Extra :class:`~excitation_pullbacks.sites.Site` fields of this call (e.g. GELU's ``approximate``)."""
        return {}

    def geometry(self, call: Call) -> Any:
        """What a substitute needs besides z (max-pool: its window geometry); None for most rules."""
        return None

    def check_substitute(self, call: Call, site: Site) -> None:
        """ValueError where a substitute's output cannot stand in for this call's (nothing for most rules)."""

    def apply(self, call: Call, site: Site, gate: Gate, canonizers: tuple) -> Any:
        """The call's output, bit for bit, with the surrogate backward of ``gate`` (a resolved gate that is not
        hard). ``canonizers``: the context's (:mod:`~excitation_pullbacks.canonizers`), for rules that reuse
        what a canonizer recorded (``canonizer.take(z)``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"
