"""Replayed pullbacks: one model's class-logit pullbacks without the engine's per-call work.

The first call at an input signature (the images' shape, dtype and device) traces what :func:`pullback`
computes - the gated forward and its backward - into one graph of ATen ops and kernel calls (``make_fx`` on
fake tensors), with the model's parameters and buffers as the graph's inputs; each later call runs that graph
on the current parameters and images. No hooks, torch-function mode or autograd bookkeeping run and the model
is not touched: on a batch-1 pullback of a small model these cost more than its layers (the explorer's case).

The graph holds the ops of :func:`pullback`'s own pass in the same order, kernels included, so the results are
:func:`pullback`'s bit for bit. Its backward part runs free of subnormals as :func:`pullback`'s does
(:func:`~excitation_pullbacks.subnormals.no_subnormals`); the forward part is left as it is.

Fake tensors hold no values, so a forward that branches on tensor values or reads one back cannot be traced:
such a model, one in train mode (BatchNorm or dropout), one with hooks of its own, a ``torch.compile``'d one,
and neuron or several-class targets run through :func:`pullback` instead (``reason`` says why). The model's
parameters, buffers, module tree, training flags and hooks are read at every call and a change is traced
anew; other changes to a module's settings after the first call (e.g. a pool's ``kernel_size``) are not seen.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from .checks import check_class_range, check_finite, check_images, class_targets
from .compiled import is_compiled
from .options import resolve_schedule
from .pullback import Neuron, Targets, check_gated, engine_for, pullback
from .rules import pool_kernel
from .schedules import Schedule
from .state import preserved_model
from .subnormals import no_subnormals
from .tracing import KERNEL_OPS, capture

__all__ = ["ReplayedPullback"]


@dataclass
class _Graph:
    run: fx.GraphModule  # (*tensors, images, targets, seed, scope) -> [(N, C, H, W) pullbacks]
    classes: int


class _BackwardScope:
    """The float state of one replay: subnormals flushed from :meth:`begin` (where the backward begins) to
    :meth:`end`, or to :meth:`close` when the graph raised in between."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self._flush = no_subnormals(dtype, device)
        self._open = False

    def begin(self) -> None:
        self._flush.__enter__()
        self._open = True

    def end(self) -> None:
        self._open = False
        self._flush.__exit__(None, None, None)

    def close(self) -> None:
        if self._open:
            self.end()


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _fresh(node: fx.Node) -> bool:
    """Whether ``node``'s value is a tensor of its own: made by an op that neither returns a view nor writes an
    input (or one of the kernels, or an item of such an op's tuple)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _fresh(node.args[0])
    if node.target in KERNEL_OPS.values():
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.is_mutable and all(r.alias_info is None for r in schema.returns)


def _accumulate_in_place(nodes: list[fx.Node], start: int) -> None:
    """Turn the backward's gradient sums ``add(a, b)`` (nodes from ``start`` on) into ``add_(a, b)`` where a is a
    fresh tensor that nothing reads afterwards, as the autograd engine sums into a gradient's buffer: a new
    buffer per sum costs page faults on every call (ResNet50's 16 residual joins at batch 16: 0.1 s)."""
    order = {node: i for i, node in enumerate(nodes)}
    for node in nodes[start:]:
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and order[a] >= start and _fresh(a)):
            continue
        others = [u for u in a.users if u is not node]
        if any(order[u] > order[node] or not _fresh(u) for u in others):
            continue
        va, vo = a.meta.get("val"), node.meta.get("val")
        if isinstance(va, Tensor) and isinstance(vo, Tensor) and va.shape == vo.shape and va.dtype == vo.dtype:
            node.target = torch.ops.aten.add_.Tensor


def _scope_backward(traced: fx.GraphModule) -> fx.GraphModule:
    """``traced`` with flat inputs (*tensors, images, targets, seed, scope) and ``scope.begin()`` before the first
    node that depends on ``seed`` (the backward's first), ``scope.end()`` before the output, the backward's
    gradient sums in place where they can be (:func:`_accumulate_in_place`). One graph, so that
    each tensor is freed at its last use as the autograd engine frees it (split into two graphs, the forward's
    saved tensors all lived to the end: 5x the page faults on ResNet50 at batch 16, 0.4 s a call)."""
    graph = traced.graph
    graph.set_codegen(fx.graph.CodeGen())
    nodes = list(graph.nodes)
    seed = [n for n in nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(seed):
        scope = graph.placeholder("scope")
    depends = {seed}
    first = None
    for node in nodes:
        if node.op not in ("placeholder", "output") and any(a in depends for a in node.all_input_nodes):
            depends.add(node)
            first = first or node
    if first is not None:
        _accumulate_in_place(nodes, nodes.index(first))
        with graph.inserting_before(first):
            graph.call_method("begin", (scope,))
        with graph.inserting_before(nodes[-1]):
            graph.call_method("end", (scope,))
    traced.recompile()
    return traced


class ReplayedPullback:
    """``pullback(model, images, targets, schedule)`` for one model and schedule, each input signature traced
    once and replayed (see the module's docstring).

    model: an ``nn.Module`` mapping (N, C, H, W) images to (N, classes) logits, in eval mode.
    schedule, **gate: the gates (:func:`~excitation_pullbacks.options.as_schedule`).
    warmup: calls at an input signature that run through :func:`pullback` before it is traced (a trace costs
        about 50 eager calls of a small CNN, a few of ResNet50: where a signature may be used only a few times,
        let it prove itself first).
    Calling it with images (N, C, H, W) and targets (an int or N ints) returns (N, C, H, W); other targets,
    and models it cannot trace, go through :func:`pullback` (``replayed`` False and ``reason`` after the call).
    A trace swaps the model's parameters for fake tensors while it runs (``torch.func.functional_call``): no
    other thread may run the model meanwhile, as with :func:`pullback`'s hooks.
    """

    def __init__(self, model: nn.Module, schedule: Schedule | float | None = None, *, warmup: int = 0, **gate):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.model = model
        self.schedule = resolve_schedule(schedule, gate)
        self.warmup = warmup
        self._graphs: dict[tuple, _Graph | str] = {}
        self._calls: dict[tuple, int] = {}
        self.replayed = False
        self.reason: str | None = None

    def __call__(self, images: Tensor, targets: Targets) -> Tensor:
        model = self.model
        self.replayed, self.reason = False, None
        if isinstance(targets, Neuron):
            return self._eager(images, targets, "neuron targets run through pullback")
        if not isinstance(images, Tensor) or images.dim() == 0:
            check_images(model, images)  # raises
        key, _, tensors = self._signature(images)
        entry = self._graphs.get(key)
        if entry is None:
            check_images(model, images)
        else:  # the shapes were checked when this signature was traced
            check_finite(images)
        n = images.shape[0]
        checked = isinstance(entry, _Graph) and type(targets) is int and 0 <= targets < entry.classes
        if checked:  # the common case, without reading a tensor back
            t = torch.full((n,), targets, dtype=torch.int64, device=images.device)
        else:
            t = class_targets(targets, n, images.device)
        if t.dim() != 1:
            return self._eager(images, t, "several classes per image run through pullback")
        if entry is None:
            calls = self._calls[key] = self._calls.get(key, 0) + 1
            if calls <= self.warmup:
                return self._eager(images, t, f"traced after {self.warmup} calls at this input signature")
            self._calls.pop(key)
            entry = self._graphs[key] = self._capture(images, t, self._signature(images, named=True)[1], tensors)
        if isinstance(entry, str):
            return self._eager(images, t, entry)
        if not checked:
            check_class_range(t, entry.classes)
        seed = torch.ones((n, 1), dtype=images.dtype, device=images.device)
        scope = _BackwardScope(images.dtype, images.device)
        try:
            with torch.no_grad():
                (out,) = entry.run(*tensors, images.detach(), t, seed, scope)
        finally:
            scope.close()
        self.replayed = True
        return out

    def _eager(self, images: Tensor, targets, reason: str) -> Tensor:
        self.reason = reason
        return pullback(self.model, images, targets, self.schedule)

    def _signature(self, images: Tensor, named: bool = False) -> tuple[tuple, list[str], list[Tensor]]:
        """(key, names, tensors): what a traced graph depends on, and the parameters and buffers it takes, in
        ``named_modules(remove_duplicate=False)`` order (names only with ``named``; one walk of the module tree
        without building names: a batch-1 call of a small model spends as long here as in a layer)."""
        modules: list[tuple] = []
        names: list[str] = []
        tensors: list[Tensor] = []

        def walk(m: nn.Module, prefix: str) -> None:
            modules.append((id(m), type(m), m.training, _hooked(m), len(m._modules)))
            for group in (m._parameters, m._buffers):
                for tname, t in group.items():
                    if t is not None:
                        tensors.append(t)
                        if named:
                            names.append(prefix + tname)
            for cname, child in m._modules.items():
                if child is not None:
                    walk(child, f"{prefix}{cname}." if named else prefix)

        walk(self.model, "")
        layout = tuple((id(t), t.shape, t.dtype, t.device) for t in tensors)
        key = (tuple(modules), layout, images.shape, images.dtype, images.device)
        return key, names, tensors

    def _capture(self, images: Tensor, t: Tensor, names: list[str], tensors: list[Tensor]) -> _Graph | str:
        """The traced graph for this signature, or why it cannot be traced."""
        model = self.model
        if is_compiled(model):
            return "a torch.compile'd model runs its own graphs through pullback"
        if any(m.training and (m._buffers or isinstance(m, nn.Dropout)) for m in model.modules()):
            return "the model is in train mode (BatchNorm would update its running statistics, dropout is random)"
        if any(_hooked(m) for m in model.modules()):
            return "the model has hooks of its own, which a traced graph would not run"
        pool_kernel.available()  # the kernel library is built before tracing, never inside it
        engine = engine_for(model, self.schedule)
        classes = []

        def gradient(tensors: list[Tensor], x: Tensor, t: Tensor, seed: Tensor) -> Tensor:
            x = x.detach().requires_grad_(True)
            with engine as report:
                out = torch.func.functional_call(model, dict(zip(names, tensors)), (x,))
            check_gated(report)
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise ValueError("the model must return (N, classes) logits")
            classes.append(out.shape[1])
            (g,) = torch.autograd.grad(out.gather(1, t[:, None]), x, grad_outputs=seed)
            return g

        seed = torch.ones((images.shape[0], 1), dtype=images.dtype, device=images.device)
        try:
            with preserved_model(model), capture(), torch.enable_grad():
                traced = make_fx(gradient, tracing_mode="fake")([v.detach() for v in tensors], images.detach(), t, seed)
        except Exception as e:  # noqa: BLE001 - any failure to trace means: run it eagerly
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"the model cannot be traced ({type(e).__name__}: {first})"
        for node in traced.graph.nodes:  # the kernels themselves, without the ops' dispatch (their bodies)
            if node.op == "call_function" and node.target in KERNEL_OPS:
                node.target = KERNEL_OPS[node.target]
        traced.graph.eliminate_dead_code()
        return _Graph(_scope_backward(traced), classes[0])
