"""``excitation(model, ...)``: gate every ReLU, SiLU, GELU and max-pool call of a model's forward, reversibly.

Nothing in the model is replaced (no module swap, no monkey-patching). While the context is open, forward
hooks on the model's modules keep track of which module is running, and a ``TorchFunctionMode`` - active only while the model's own forward
runs - reroutes each ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place
forms), each SiLU and GELU call (``nn.SiLU``, ``nn.GELU``, ``F.silu`` also in place, ``F.gelu`` in both
``approximate`` forms) and each max-pool call (``nn.MaxPool2d``, ``F.max_pool2d``, ``torch.max_pool2d``) to
the surrogates.
That reaches reused modules (ResNet's ``Bottleneck.relu``, three calls) and functional calls in a
``forward`` (DenseNet's ``F.relu(features, inplace=True)``) that swapping modules misses. On exit, normal or
by exception, the hooks are removed; other models, and code outside the model's forward, are untouched.

In-place ReLUs and SiLUs are run out of place when their gate is soft: the soft gate needs z, which the
in-place op would overwrite. Code that discards the result of an in-place call and reads its input instead
is not supported (no torchvision model does this).

Other nonlinearities with an activation derivative (Hardswish, Mish, ELU, ...) keep their own gradient and
are named in an ``UngatedActivationWarning``. Sigmoid, tanh and softmax are not reported: in classifiers
they scale features (EfficientNet's squeeze-excitation multiplies x by sigmoid(.)) or weight attention;
they are not the gate s(z) of an activation z * s(z), so there is no gate to soften, and their exact
gradient is kept.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .compiled import gated_call, is_compiled, unwrap_compiled
from .gates import Gate, Schedule, Site, resolve_schedule
from .surrogates import frozen_batch_norm, soft_gelu, soft_max_pool2d, soft_relu, soft_relu_of_batch_norm, soft_silu

__all__ = ["Excitation", "PoolArgs", "Report", "Substitute", "UngatedActivationWarning", "excitation"]

_RELU = {F.relu, torch.relu, Tensor.relu, torch.relu_, Tensor.relu_}
_RELU_INPLACE = {torch.relu_, Tensor.relu_}
_POOL = {F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d}
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_SMOOTH = {F.silu: "silu", F.gelu: "gelu"}

# Nonlinearities whose gradient the engine leaves as it is: named in a warning, never silently passed.
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
    )
}


@dataclass(frozen=True)
class PoolArgs:
    """The geometry of one max-pool call (as ``F.max_pool2d`` takes it), handed to a :data:`Substitute`."""

    kernel_size: object
    stride: object = None
    padding: object = 0
    dilation: object = 1
    ceil_mode: bool = False


#: ``substitute(site, z, pool)`` at each ReLU (pool None) and max-pool call (pool its :class:`PoolArgs`):
#: a returned tensor replaces the call's output (gating-induced networks), None keeps the call as it is.
Substitute = Callable[[Site, Tensor, "PoolArgs | None"], "Tensor | None"]


class _BatchNormOutput(NamedTuple):
    """z = F.batch_norm(x, mean, var, weight, bias, eps=eps) (eval) with ``addends`` added in place since, as
    of z's ``version``: what an in-place ReLU of z needs to recompute z in its backward."""

    z: Tensor
    version: int
    x: Tensor
    mean: Tensor
    var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    addends: tuple = ()


class UngatedActivationWarning(UserWarning):
    """The model uses a nonlinearity whose gradient the excitation engine does not replace."""


@dataclass
class Report:
    """What the last forward pass inside the context gated.

    relu / maxpool / silu / gelu: {site name: number of calls} in the most recent forward pass.
    forwards: forward passes run inside the context.
    ungated: {description: calls} of nonlinearities left with their own gradient.
    """

    relu: dict[str, int] = field(default_factory=dict)
    maxpool: dict[str, int] = field(default_factory=dict)
    forwards: int = 0
    ungated: dict[str, int] = field(default_factory=dict)
    silu: dict[str, int] = field(default_factory=dict)
    gelu: dict[str, int] = field(default_factory=dict)

    @property
    def relu_calls(self) -> int:
        return sum(self.relu.values())

    @property
    def maxpool_calls(self) -> int:
        return sum(self.maxpool.values())

    @property
    def silu_calls(self) -> int:
        return sum(self.silu.values())

    @property
    def gelu_calls(self) -> int:
        return sum(self.gelu.values())

    @property
    def total(self) -> int:
        return self.relu_calls + self.maxpool_calls + self.silu_calls + self.gelu_calls

    def __str__(self) -> str:
        smooth = "".join(
            f", {n} {label} at {len(sites)} sites"
            for label, n, sites in (("SiLU", self.silu_calls, self.silu), ("GELU", self.gelu_calls, self.gelu))
            if sites
        )
        lines = [
            (
                f"gated calls per forward: {self.relu_calls} ReLU at {len(self.relu)} sites, "
                f"{self.maxpool_calls} max-pool at {len(self.maxpool)} sites{smooth} ({self.forwards} forward passes)"
            )
        ]
        for kind, sites in (("relu", self.relu), ("maxpool", self.maxpool), ("silu", self.silu), ("gelu", self.gelu)):
            lines += [f"  {kind:8s} {name}" + (f" x{n}" if n > 1 else "") for name, n in sites.items()]
        if self.ungated:
            lines.append("  not gated: " + ", ".join(f"{k} x{v}" for k, v in self.ungated.items()))
        return "\n".join(lines)


class _Mode(TorchFunctionMode):
    def __init__(self, owner: Excitation):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU:
            return self.owner._relu(func, args, kwargs)
        if func in _POOL:
            return self.owner._pool(func, args, kwargs)
        if func in _SMOOTH:
            return self.owner._smooth(func, args, kwargs)
        if func is F.batch_norm and self.owner.lean_batchnorm:
            return self.owner._batch_norm(func, args, kwargs)
        if func is Tensor.add_ and self.owner._made:
            return self.owner._add_(func, args, kwargs)
        name = _UNGATED_FUNCS.get(func)
        if name is not None:
            self.owner._note_ungated(name)
        return func(*args, **kwargs)


class Excitation:
    """Context manager that gates a model's ReLU, SiLU, GELU and max-pool calls; see :func:`excitation`.

    schedule, **gate: the gate of every call site (:func:`~excitation_pullbacks.gates.as_schedule`).
    observer: called as observer(site, z, gate) with each gated call's input and its gate (``own`` resolved for the site) during the forward (calibration, path
    kernel). lean_batchnorm: run eval-mode BatchNorm with frozen parameters through ``frozen_batch_norm``
    (same output, backward keeps no activation); only meaningful while the parameters are frozen, as
    ``pullback`` and ``ascent`` do.
    A model wrapped by ``torch.compile`` is gated through its original module (same site names); the
    compiled wrapper traces the gating into its graphs (:mod:`~excitation_pullbacks.compiled`).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | float | None = None,
        *,
        observer: Callable[[Site, Tensor, Gate], None] | None = None,
        lean_batchnorm: bool = False,
        substitute: Substitute | None = None,
        **gate,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.root = unwrap_compiled(model)  # hooks and site names: the original module behind torch.compile
        self.schedule = resolve_schedule(schedule, gate)
        self.observer = observer
        self.lean_batchnorm = lean_batchnorm
        self.substitute = substitute
        self.report = Report()
        self._names = {m: n for n, m in self.root.named_modules(remove_duplicate=False)}
        self._stack: list[nn.Module] = []
        self._handles: list = []
        self._mode: _Mode | None = None
        self._counts: Counter = Counter()
        self._depth: Counter = Counter()
        self._linear_out: Tensor | None = None  # the latest nn.Linear output: its features are in the last dim
        # The latest lean BatchNorm outputs: an in-place ReLU of one runs in place, recomputing z from x
        # (soft_relu_of_batch_norm). Two, for a residual block whose shortcut BatchNorm runs between the main
        # branch's and its ReLU.
        self._made: list[_BatchNormOutput] = []
        self._open = False
        self._forward = None  # the compiled wrapper's own forward while the context routes it (see compiled.py)
        self.compiled_tag = ""  # "neuron" while a neuron hook is added: separate compiled graphs

    # -- context ---------------------------------------------------------------------------------------
    def __enter__(self) -> Report:
        if self._open:
            raise RuntimeError("this excitation context is already open")
        try:
            # always_call: the stack stays right when a forward raises; not under torch.compile, whose graphs
            # guard on the (new each time) hook ids that always_call records (__exit__ closes the pass anyway).
            always = not is_compiled(self.model)
            for module in self._names:  # each module once, also when registered under several names
                self._handles.append(module.register_forward_pre_hook(self._enter_module))
                self._handles.append(module.register_forward_hook(self._exit_module, always_call=always))
        except BaseException:
            self._remove_hooks()
            raise
        if is_compiled(self.model):
            self._forward = self.model.__dict__.get("forward")
            self.model.forward = gated_call(self.model, self.compiled_tag)
        self._open = True
        return self.report

    def __exit__(self, *exc) -> None:
        if self._forward is not None:
            self.model.forward = self._forward
            self._forward = None
        self._remove_hooks()
        self._stack.clear()
        self._linear_out = None
        self._made = []
        if self._mode is not None:  # only if a forward was interrupted before its hooks could close it
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._open = False

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks ---------------------------------------------------------------------------------------
    def _enter_module(self, module, args):
        if not self._stack:  # the model's outermost forward begins
            self._counts.clear()
            self._depth.clear()
            self.report.relu = {}
            self.report.maxpool = {}
            self.report.silu = {}
            self.report.gelu = {}
            self._linear_out = None
            self._made = []
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
            self._linear_out = None
            self._made = []

    # -- sites ---------------------------------------------------------------------------------------
    def _caller(self) -> tuple[nn.Module, str]:
        """The innermost running module of the model and its path (``<root>`` for the model itself)."""
        inner = self._stack[-1] if self._stack else self.root
        return inner, self._names.get(inner, "") or "<root>"

    def _site(self, kind: str, func_name: str, module_types, z: Tensor | None = None, approximate="none") -> Site:
        inner, path = self._caller()
        name = path if isinstance(inner, module_types) else f"{path}:{func_name}"
        call = self._counts[name]
        self._counts[name] += 1
        depth = self._depth[kind]
        self._depth[kind] += 1
        sites = getattr(self.report, kind)
        sites[name] = sites.get(name, 0) + 1
        channel_dim = 1
        if z is not None and z.dim() > 2 and z is self._linear_out:
            channel_dim = z.dim() - 1
        return Site(
            name,
            kind,
            call=call,
            depth=depth,
            module_type=type(inner).__name__,
            channel_dim=channel_dim,
            approximate=approximate,
        )

    def _gate(self, site: Site, z: Tensor) -> Gate:
        gate = self.schedule.rule(site).resolve(site.activation)
        if self.observer is not None:
            self.observer(site, z, gate)
        return gate

    def _relu(self, func, args, kwargs):
        z = args[0] if args else kwargs["input"]
        site = self._site("relu", "relu", nn.ReLU, z)
        gate = self._gate(site, z)
        if self.substitute is not None:
            out = self.substitute(site, z, None)
            if out is not None:
                return out
        if gate.is_hard:
            return func(*args, **kwargs)  # the original call, in place if it was
        made = self._made_by_batch_norm(z)
        inplace = func in _RELU_INPLACE or kwargs.get("inplace", False) or (func is F.relu and args[1:2] == (True,))
        if inplace and made is not None and z.requires_grad:
            return soft_relu_of_batch_norm(
                z, gate, made.x, made.mean, made.var, made.weight, made.bias, made.eps, made.addends, site.channel_dim
            )
        return soft_relu(z, gate, site.channel_dim)  # soft gates need z intact: out of place

    def _smooth(self, func, args, kwargs):
        kind = _SMOOTH[func]
        z = args[0] if args else kwargs["input"]
        approximate = "none"
        if kind == "gelu":
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        site = self._site(kind, kind, nn.SiLU if kind == "silu" else nn.GELU, z, approximate)
        gate = self._gate(site, z)
        if gate.is_hard:
            return func(*args, **kwargs)  # the native op and its exact derivative, in place if it was
        if kind == "silu":
            return soft_silu(z, gate, site.channel_dim)  # out of place: the gate needs z
        return soft_gelu(z, gate, approximate, site.channel_dim)

    def _pool(self, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        site = self._site("maxpool", "max_pool2d", nn.MaxPool2d)
        gate = self._gate(site, x)
        params = dict(zip(_POOL_ARGS, args[1:]))
        params.update({k: v for k, v in kwargs.items() if k != "input"})
        if func is F.max_pool2d_with_indices:
            params["return_indices"] = True
        if self.substitute is not None:
            pool = PoolArgs(
                params["kernel_size"],
                params.get("stride"),
                params.get("padding", 0),
                params.get("dilation", 1),
                bool(params.get("ceil_mode", False)),
            )
            out = self.substitute(site, x, pool)
            if out is not None:
                if params.get("return_indices"):
                    raise ValueError(f"a substituted max-pool call cannot return indices ({site.key})")
                return out
        if gate.is_hard:
            return func(*args, **kwargs)
        return soft_max_pool2d(
            x,
            gate,
            params["kernel_size"],
            params.get("stride"),
            params.get("padding", 0),
            params.get("dilation", 1),
            ceil_mode=bool(params.get("ceil_mode", False)),
            return_indices=bool(params.get("return_indices", False)),
        )

    def _batch_norm(self, func, args, kwargs):
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = dict(zip(names, args))
        a.update(kwargs)
        w, b = a.get("weight"), a.get("bias")
        frozen = not any(isinstance(p, Tensor) and p.requires_grad for p in (w, b))
        if a.get("training", False) or a.get("running_mean") is None or not frozen:
            return func(*args, **kwargs)
        x, mean, var, eps = a["input"], a["running_mean"], a["running_var"], a.get("eps", 1e-5)
        out = frozen_batch_norm(x, mean, var, w, b, eps)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._made = [*self._made[-1:], _BatchNormOutput(out, out._version, x, mean, var, w, b, eps)]
        return out

    def _made_by_batch_norm(self, z: Tensor) -> _BatchNormOutput | None:
        """The record of z if z is a recent lean BatchNorm output unchanged since (then taken off the list)."""
        for i, made in enumerate(self._made):
            if z is made.z:
                del self._made[i]
                return made if z._version == made.version else None
        return None

    def _add_(self, func, args, kwargs):
        """Tensor.add_: a residual sum added in place to a recent lean BatchNorm output is recorded with it."""
        z = args[0]
        made = self._made_by_batch_norm(z)
        out = func(*args, **kwargs)
        other = args[1] if len(args) == 2 else None
        if made and not kwargs and isinstance(other, Tensor) and other.shape == z.shape and other.dtype == z.dtype:
            self._made.append(made._replace(version=z._version, addends=(*made.addends, other)))
        return out

    def _note_ungated(self, func_name: str) -> None:
        inner, path = self._caller()
        kind = type(inner).__name__
        same = kind.lower() == func_name.replace("_", "")
        what = f"{path} ({kind})" if same else f"{path}:{func_name}"
        first = what not in self.report.ungated
        self.report.ungated[what] = self.report.ungated.get(what, 0) + 1
        if first:
            warnings.warn(
                f"excitation: {what} keeps its own gradient (only ReLU, SiLU, GELU and max-pool are gated)",
                UngatedActivationWarning,
                stacklevel=2,
            )


def excitation(model: nn.Module, schedule: Schedule | float | None = None, **gate) -> Excitation:
    """Gate every ReLU, SiLU, GELU and max-pool call of ``model`` inside a ``with`` block.

    ``with excitation(model, 0.3) as report:`` - forward passes of ``model`` inside the block give
    bit-identical outputs; their backward uses the soft gates. ``report`` (a :class:`Report`) counts the
    gated calls of the latest forward pass per site.
    schedule, **gate: the gates (:func:`~excitation_pullbacks.gates.as_schedule`); ``temperature=0`` (or
    ``gate="hard"``) gives the vanilla gradient, a Schedule per-site gates (e.g.
    ``make_schedule(smooth_temperature=1.0)`` for the network's own SiLU/GELU gates).
    """
    return Excitation(model, schedule, **gate)
