"""``excitation(model, ...)``: gate every call a rule covers in a model's forward, reversibly.

Nothing in the model is replaced (no module swap, no monkey-patching). While the context is open, forward
hooks on the model's modules keep track of which module is running, and a ``TorchFunctionMode`` - active only
while the model's own forward runs - hands each torch call that a registered rule handles
(:mod:`~excitation_pullbacks.rules`: ReLU, SiLU, GELU, max-pool, LayerNorm/GroupNorm, attention, ...) to that
rule with its site and gate, and each call a canonizer watches (the lean BatchNorm) to the canonizer. That
reaches reused modules (ResNet's ``Bottleneck.relu``, three calls) and functional calls in a ``forward``
(DenseNet's ``F.relu(features, inplace=True)``, torchvision Swin's explicit attention softmax) that swapping
modules misses. On exit, normal or by exception, the hooks are removed; other models, and code outside the
model's forward, are untouched.

Other nonlinearities with an activation derivative (Hardswish, Mish, ELU, ...) and normalisations no rule
covers keep their own gradient and are named in an ``UngatedActivationWarning`` and the report. Sigmoid and
tanh are not reported: in classifiers they scale features (EfficientNet's squeeze-excitation multiplies x by
sigmoid(.)); they are not the gate s(z) of an activation z * s(z), so there is no gate to soften.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .canonizers import Canonizer, LeanBatchNorm
from .compiled import CompiledRoute, unwrap_compiled
from .gates import Gate
from .options import GateOptions, resolve_schedule
from .rules import PoolArgs, Rule, rules
from .rules.base import binder
from .schedules import Schedule
from .sites import Site

__all__ = ["Excitation", "PoolArgs", "Report", "Substitute", "UngatedActivationWarning", "excitation"]

# Calls the engine leaves as they are: named in a warning and the report, never silently passed.
_UNGATED_FUNCS = {
    getattr(F, name): name
    for name in (
        "mish",
        "hardswish",
        "hardsigmoid",
        "elu",
        "selu",
        "celu",
        "leaky_relu",
        "rrelu",
        "relu6",
        "hardtanh",
        "prelu",
        "softplus",
        "glu",
        "max_pool1d",
        "max_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
        "instance_norm",
        "local_response_norm",
    )
}

#: ``substitute(site, z, geometry)`` at each gated call (geometry: the rule's, e.g. a max-pool's
#: :class:`PoolArgs`, else None): a returned tensor replaces the call's output (gating-induced networks),
#: None keeps the call as it is.
Substitute = Callable[[Site, Tensor, Any], "Tensor | None"]


_LABELS = {"relu": "ReLU", "maxpool": "max-pool", "silu": "SiLU", "gelu": "GELU"}


class UngatedActivationWarning(UserWarning):
    """The model uses a nonlinearity whose gradient the excitation engine does not replace."""


@dataclass
class Report:
    """What the last forward pass inside the context gated.

    sites: {kind: {site name: number of calls}} in the most recent forward pass (``relu``, ``maxpool``,
        ``silu``, ``gelu``, ``norm``, ``attention``, ... in the order the kinds were first called).
    forwards: forward passes run inside the context.
    ungated: {description: calls} of calls left with their own gradient.
    """

    sites: dict[str, dict[str, int]] = field(default_factory=dict)
    forwards: int = 0
    ungated: dict[str, int] = field(default_factory=dict)

    def of(self, kind: str) -> dict[str, int]:
        """{site name: calls} of one kind."""
        return self.sites.get(kind, {})

    def calls(self, kind: str) -> int:
        return sum(self.of(kind).values())

    @property
    def relu(self) -> dict[str, int]:
        return self.of("relu")

    @property
    def maxpool(self) -> dict[str, int]:
        return self.of("maxpool")

    @property
    def silu(self) -> dict[str, int]:
        return self.of("silu")

    @property
    def gelu(self) -> dict[str, int]:
        return self.of("gelu")

    @property
    def relu_calls(self) -> int:
        return self.calls("relu")

    @property
    def maxpool_calls(self) -> int:
        return self.calls("maxpool")

    @property
    def silu_calls(self) -> int:
        return self.calls("silu")

    @property
    def gelu_calls(self) -> int:
        return self.calls("gelu")

    @property
    def total(self) -> int:
        return sum(self.calls(kind) for kind in self.sites)

    def __str__(self) -> str:
        kinds = ["relu", "maxpool", *(k for k in self.sites if k not in ("relu", "maxpool"))]
        counts = ", ".join(f"{self.calls(k)} {_LABELS.get(k, k)} at {len(self.of(k))} sites" for k in kinds)
        lines = [f"gated calls per forward: {counts} ({self.forwards} forward passes)"]
        for kind, sites in self.sites.items():
            lines += [f"  {kind:10s} {name}" + (f" x{n}" if n > 1 else "") for name, n in sites.items()]
        if self.ungated:
            lines.append("  not gated: " + ", ".join(f"{k} x{v}" for k, v in self.ungated.items()))
        return "\n".join(lines)


class _Mode(TorchFunctionMode):
    def __init__(self, owner: Excitation):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        rule = owner._rules.get(func)
        if rule is not None:
            return owner._dispatch(rule, func, args, kwargs)
        canonizer = owner._canonizers.get(func)
        if canonizer is not None:
            return canonizer.handle(func, args, kwargs)
        name = _UNGATED_FUNCS.get(func)
        if name is not None:
            owner._note_ungated(name)
        return func(*args, **kwargs)


class Excitation:
    """Context manager that gates every call a registered rule covers; see :func:`excitation`.

    schedule, **gate: the gate of every call site (:func:`~excitation_pullbacks.options.as_schedule`).
    observer: called as observer(site, z, gate) with each gated call's input and its gate (``own`` resolved
        for the site) during the forward (calibration, path kernel).
    lean_batchnorm: add the :class:`~excitation_pullbacks.canonizers.LeanBatchNorm` canonizer (same output,
        backward keeps no activation); only meaningful while the parameters are frozen, as ``pullback`` and
        ``ascent`` do. canonizers: further canonizers.
    substitute: see :data:`Substitute`.
    A model wrapped by ``torch.compile`` is gated through its original module (same site names); the
    compiled wrapper traces the gating into its graphs (:mod:`~excitation_pullbacks.compiled`).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | GateOptions | float | None = None,
        *,
        observer: Callable[[Site, Tensor, Gate], None] | None = None,
        lean_batchnorm: bool = False,
        canonizers: tuple[Canonizer, ...] = (),
        substitute: Substitute | None = None,
        **gate,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.root = unwrap_compiled(model)  # hooks and site names: the original module behind torch.compile
        self.schedule = resolve_schedule(schedule, gate)
        self.observer = observer
        self.substitute = substitute
        self.canonizers = ((LeanBatchNorm(),) if lean_batchnorm else ()) + tuple(canonizers)
        self.report = Report()
        self.route = CompiledRoute(model)
        self._names = {m: n for n, m in self.root.named_modules(remove_duplicate=False)}
        self._stack: list[nn.Module] = []
        self._handles: list = []
        self._mode: _Mode | None = None
        self._counts: Counter = Counter()
        self._depth: Counter = Counter()
        self._linear_out: Tensor | None = None  # the latest nn.Linear output: its features are in the last dim
        self._ungated: dict[str, list[str]] = {}
        self._rules: dict[Callable, Rule] = {}
        self._canonizers: dict[Callable, Canonizer] = {}
        self._open = False

    # -- context ---------------------------------------------------------------------------------------
    def __enter__(self) -> Report:
        if self._open:
            raise RuntimeError("this excitation context is already open")
        registered = rules()
        self._rules = {func: rule for rule in registered for func in rule.functions}
        self._canonizers = {func: c for c in self.canonizers for func in c.functions}
        for c in self.canonizers:  # signatures read before any compiled graph traces a call
            for func, stub in c.functions.items():
                binder(func, stub)
        if self.route.compiled:
            for rule in registered:
                rule.prepare()
        try:
            # always_call: the stack stays right when a forward raises; not under torch.compile, whose graphs
            # guard on the (new each time) hook ids that always_call records (__exit__ closes the pass anyway).
            always = not self.route.compiled
            for module in self._names:  # each module once, also when registered under several names
                self._handles.append(module.register_forward_pre_hook(self._enter_module))
                self._handles.append(module.register_forward_hook(self._exit_module, always_call=always))
        except BaseException:
            self._remove_hooks()
            raise
        self.route.open()
        self._open = True
        return self.report

    def __exit__(self, *exc) -> None:
        self.route.close()
        self._remove_hooks()
        self._stack.clear()
        self._end_pass()
        if self._mode is not None:  # only if a forward was interrupted before its hooks could close it
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._open = False

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _end_pass(self) -> None:
        if self._ungated:
            self._warn_ungated()
        self._linear_out = None
        for canonizer in self.canonizers:
            canonizer.reset()

    # -- hooks ---------------------------------------------------------------------------------------
    def _enter_module(self, module, args):
        if not self._stack:  # the model's outermost forward begins
            self._counts.clear()
            self._depth.clear()
            self.report.sites = {}
            self._end_pass()
            self.report.forwards += 1
            self._mode = _Mode(self)
            self._mode.__enter__()
        self._stack.append(module)

    def _exit_module(self, module, args, output):
        if isinstance(module, nn.Linear):
            self._linear_out = output
        elif output is not self._linear_out:  # containers that return the Linear's output keep it
            self._linear_out = None
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        if not self._stack and self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            self._end_pass()

    # -- sites ---------------------------------------------------------------------------------------
    def _caller(self) -> tuple[nn.Module, str]:
        """The innermost running module of the model and its path (``<root>`` for the model itself)."""
        inner = self._stack[-1] if self._stack else self.root
        return inner, self._names.get(inner, "") or "<root>"

    def _site(self, rule: Rule, z: Tensor | None, details: dict) -> Site:
        inner, path = self._caller()
        name = path if isinstance(inner, rule.modules) else f"{path}:{rule.name}"
        call = self._counts[name]
        self._counts[name] += 1
        kind = rule.kind
        depth = self._depth[kind]
        self._depth[kind] += 1
        sites = self.report.sites.setdefault(kind, {})
        sites[name] = sites.get(name, 0) + 1
        channel_dim = 1
        if isinstance(z, Tensor) and z.dim() > 2 and z is self._linear_out:
            channel_dim = z.dim() - 1
        cls = type(inner)
        return Site(
            name,
            kind,
            call=call,
            depth=depth,
            module_type=cls.__name__,
            channel_dim=channel_dim,
            module_class=f"{cls.__module__}.{cls.__qualname__}",
            **details,
        )

    def _dispatch(self, rule: Rule, func, args, kwargs):
        """One call a rule handles: its site, its gate, then the native call or the rule's surrogate."""
        call = rule.bind(func, args, kwargs)
        if not rule.handles(call):
            return call.run()
        z = rule.input(call)
        site = self._site(rule, z, rule.details(call))
        gate = self.schedule.rule(site).resolve(site.activation)
        if self.observer is not None:
            self.observer(site, z, gate)
        if self.substitute is not None:
            out = self.substitute(site, z, rule.geometry(call))
            if out is not None:
                rule.check_substitute(call, site)
                return out
        if gate.is_hard:
            return call.run()  # the original call, in place if it was
        return rule.apply(call, site, gate, self.canonizers)

    def _note_ungated(self, func_name: str) -> None:
        inner, path = self._caller()
        kind = type(inner).__name__
        same = kind.lower() == func_name.replace("_", "")
        what = f"{path} ({kind})" if same else f"{path}:{func_name}"
        self.report.ungated[what] = self.report.ungated.get(what, 0) + 1
        self._ungated.setdefault(func_name, []).append(what)

    def _warn_ungated(self) -> None:
        """One warning per op no rule covers in the pass just ended: the op, its calls, its first sites."""
        for func_name, sites in self._ungated.items():
            names = list(dict.fromkeys(sites))
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            warnings.warn(
                f"excitation: no rule covers {func_name} ({len(sites)} calls: {shown}); its own gradient is kept",
                UngatedActivationWarning,
                stacklevel=4,
            )
        self._ungated = {}


def excitation(model: nn.Module, schedule: Schedule | GateOptions | float | None = None, **gate) -> Excitation:
    """Gate every call a registered rule covers (ReLU, SiLU, GELU, max-pool, ...) of ``model`` in a ``with``
    block.

    ``with excitation(model, 0.3) as report:`` - forward passes of ``model`` inside the block give
    bit-identical outputs; their backward uses the soft gates. ``report`` (a :class:`Report`) counts the
    gated calls of the latest forward pass per site.
    schedule, **gate: the gates (:func:`~excitation_pullbacks.options.as_schedule`); ``temperature=0`` (or
    ``gate="hard"``) gives the vanilla gradient, a Schedule per-site gates, ``preset("semantic")`` the
    deep-network method.
    """
    return Excitation(model, schedule, **gate)
