"""Excitation pullbacks of class logits or hidden neurons.

All functions take the model as the user has it (any ``nn.Module`` mapping images to logits; wrap
torchvision backbones in :class:`~excitation_pullbacks.models.ImageNetInput` for images in [-1, 1]) and
leave it as it was (:func:`~excitation_pullbacks.state.preserved_model`): parameters are frozen only for the
duration of the call (so the backward computes no weight gradients), and every buffer and flag is restored,
also after an exception. A model in train mode is run as it is: BatchNorm normalises with the batch's
statistics (each image's result then depends on the others in its batch) but its running statistics are put
back afterwards.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import check_class_range, check_images, class_targets, warn_if_training
from .compiled import unwrap_compiled
from .gating import Excitation, Report
from .options import resolve_schedule
from .schedules import ByType, Schedule
from .state import preserved_model
from .stopping import ShouldStop, check_stop
from .subnormals import no_subnormals

__all__ = ["Neuron", "Targets", "check_gated", "engine_for", "frozen_parameters", "gated_forward", "pullback"]


@dataclass(frozen=True)
class Neuron:
    """A hidden-neuron target: channel ``channel`` of the output of module ``layer``.

    position: (h, w) for one spatial position; None sums the channel over all positions (or tokens).
    call: which call of a module used several times (-1: the last).
    layout: where the channel is in the output: ``channels_first`` (N, C, ...: convolutions), ``tokens``
        (N, L, C: transformer blocks; ``token`` picks the position along L), ``channels_last`` (N, H, W, C:
        Swin and ConvNeXt blocks); ``auto``: ``tokens`` for 3-dim outputs, else ``channels_first``.
    token: the token index for the ``tokens`` layout (e.g. 0, a ViT's class token); None sums over tokens.
    """

    layer: str
    channel: int
    position: tuple[int, int] | None = None
    call: int = -1
    layout: str = "auto"
    token: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "channels_first", "tokens", "channels_last"):
            raise ValueError(f"unknown layout {self.layout!r}; choose auto, channels_first, tokens or channels_last")


Targets = int | Sequence[int] | Sequence[Sequence[int]] | Tensor | Neuron


@contextmanager
def frozen_parameters(model: nn.Module):
    """Set requires_grad=False on every parameter for the block; restore each flag afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _resolve_module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(unwrap_compiled(model).named_modules())
    if layer not in modules:
        close = difflib.get_close_matches(layer, list(modules), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown layer name {layer!r}{hint}")
    return modules[layer]


def _neuron_value(out, neuron: Neuron) -> Tensor:
    if not isinstance(out, Tensor):
        raise ValueError(f"layer {neuron.layer!r} does not output a single tensor")  # noqa: TRY004
    layout = neuron.layout
    if layout == "auto":
        layout = "tokens" if out.dim() == 3 else "channels_first"
    if out.dim() < 2 or (layout != "channels_first" and out.dim() < 3):
        raise ValueError(f"layer {neuron.layer!r} output {tuple(out.shape)} has no {layout} channels")
    dim = 1 if layout == "channels_first" else out.dim() - 1
    if not 0 <= neuron.channel < out.shape[dim]:
        raise ValueError(
            f"channel {neuron.channel} is out of range for layer {neuron.layer!r} output {tuple(out.shape)}"
        )
    a = out.select(dim, neuron.channel)  # (N, ...) without the channel dim
    if layout == "tokens" and neuron.token is not None:
        if not -a.shape[1] <= neuron.token < a.shape[1]:
            raise ValueError(
                f"token {neuron.token} is out of range for layer {neuron.layer!r} output {tuple(out.shape)}"
            )
        return a[:, neuron.token]
    if neuron.position is None:
        return a.reshape(a.shape[0], -1).sum(1)
    h, w = neuron.position
    if a.dim() != 3 or not (0 <= h < a.shape[1] and 0 <= w < a.shape[2]):
        raise ValueError(
            f"position {neuron.position} is out of range for layer {neuron.layer!r} output {tuple(out.shape)}"
        )
    return a[:, h, w]


def engine_for(model: nn.Module, schedule: Schedule) -> Excitation:
    """The engine used with frozen parameters: lean BatchNorm backward unless every gate is hard (then the
    native ops run untouched and the result is the vanilla gradient bit for bit)."""
    all_hard = isinstance(schedule, ByType) and schedule.is_hard
    return Excitation(model, schedule, lean_batchnorm=not all_hard)


def check_gated(report: Report) -> None:
    """Raise ValueError when the forward pass ``report`` describes made no call that a rule covers."""
    if report.total == 0:
        raise ValueError(
            "the model made no call that a rule covers (ReLU, SiLU, GELU, max-pool, norm, attention): there is nothing to gate"
        )


def gated_forward(engine: Excitation, x: Tensor, neuron: Neuron | None = None) -> Tensor:
    """Run ``engine.model`` on x under the engine; returns logits (N, classes) or the neuron's values (N,).
    Raises ValueError when the model made no gated call or returns no (N, classes) logits."""
    if neuron is None:
        with engine as report:
            out = engine.model(x)
        check_gated(report)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError(
                f"the model must return logits of shape (N, classes), got {getattr(out, 'shape', type(out))}"
            )
        return out
    module = _resolve_module(engine.model, neuron.layer)
    outs: list = []
    # clone: the forward may modify the layer's output in place later (e.g. an in-place ReLU)
    handle = module.register_forward_hook(lambda m, a, o: outs.append(o.clone() if isinstance(o, Tensor) else o))
    try:
        with engine.route.tagged("neuron"), engine as report:
            engine.model(x)
    finally:
        handle.remove()
    check_gated(report)
    if not outs:
        raise ValueError(f"layer {neuron.layer!r} was not called in the forward pass")
    if not -len(outs) <= neuron.call < len(outs):
        raise ValueError(f"layer {neuron.layer!r} was called {len(outs)} times; call {neuron.call} does not exist")
    return _neuron_value(outs[neuron.call], neuron)


def pullback(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    schedule: Schedule | float | None = None,
    *,
    batch_size: int | None = None,
    should_stop: ShouldStop = None,
    **gate,
) -> Tensor:
    """Excitation pullbacks of ``targets`` at ``images``.

    images: (N, C, H, W) (any range the model takes; [-1, 1] with ImageNetInput).
    targets: an int (same class for every image) or N ints -> returns (N, C, H, W);
        N lists of K ints, or an (N, K) tensor -> returns (N, K, C, H, W), one forward per image batch and
        K backward passes sharing it (a ``torch.compile``'d model: one forward per target); or a :class:`Neuron` -> (N, C, H, W).
    schedule, **gate: the gates (:func:`~excitation_pullbacks.gates.as_schedule`), e.g. ``0.3``,
        ``temperature=0`` (the exact vanilla input gradient) or a Schedule.
    batch_size: images per forward pass (None: all at once), to bound memory.
    should_stop: called before each forward and backward pass; True ends the call with
        :class:`~excitation_pullbacks.stopping.Stopped`.
    The backward passes run free of subnormal floats in float32 on CPU, the caller's float state restored
    (:func:`~excitation_pullbacks.subnormals.no_subnormals`).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
    sched = resolve_schedule(schedule, gate)
    check_images(model, images)
    n = images.shape[0]
    neuron = targets if isinstance(targets, Neuron) else None
    if neuron is not None:
        _resolve_module(model, neuron.layer)
        t = None
    else:
        t = class_targets(targets, n, images.device)  # range checked against the logits
    warn_if_training(model)
    engine = engine_for(model, sched)
    step = batch_size or n
    chunks = []
    with preserved_model(model, freeze=True), torch.enable_grad():
        for start in range(0, n, step):
            check_stop(should_stop)
            x = images[start : start + step].detach().requires_grad_(True)
            chunks.append(
                _pullback_chunk(engine, x, None if t is None else t[start : start + step], neuron, should_stop)
            )
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def _pullback_chunk(
    engine: Excitation, x: Tensor, t: Tensor | None, neuron: Neuron | None, should_stop: ShouldStop = None
) -> Tensor:
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and engine.route.compiled:
        # a compiled backward may hold donated buffers, which refuse retain_graph: one forward per target
        grads = []
        for j in range(t.shape[1]):
            check_stop(should_stop)
            grads.append(_pullback_chunk(engine, x, t[:, j], None, should_stop))
        return torch.stack(grads, 1)
    out = gated_forward(engine, x, neuron)
    if neuron is not None:
        with no_subnormals(x.dtype, x.device):
            (g,) = torch.autograd.grad(out.sum(), x)
        return g
    check_class_range(t, out.shape[1])
    if t.dim() == 1:
        with no_subnormals(x.dtype, x.device):
            (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x)
        return g
    k = t.shape[1]
    grads = []
    for j in range(k):  # the gates depend only on the forward pass: K backward passes share it
        check_stop(should_stop)
        with no_subnormals(x.dtype, x.device):
            (g,) = torch.autograd.grad(out.gather(1, t[:, j : j + 1]).sum(), x, retain_graph=j < k - 1)
        grads.append(g)
    return torch.stack(grads, 1)
