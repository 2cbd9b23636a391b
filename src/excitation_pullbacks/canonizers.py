"""Canonizers: rewrites of what the backward sees that are not gates (Zennit's term), kept apart from the rules.

:class:`LeanBatchNorm` runs eval-mode BatchNorm with frozen parameters through ``frozen_batch_norm`` (same
output; the backward keeps the (C,) scale instead of the activation) and remembers its latest outputs, so
that an in-place ReLU of one (also after an in-place residual ``out += identity``) can run in place and
recompute z in its backward (``ReLU`` rule -> :meth:`LeanBatchNorm.take`). ``pullback`` and ``ascent`` use
it while the parameters are frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .gates import Gate
from .rules.base import Call
from .rules.batch_norm import frozen_batch_norm, soft_relu_of_batch_norm

__all__ = ["Canonizer", "LeanBatchNorm"]


class Canonizer:
    """Sees the calls of ``functions`` inside the model's forward and may replace them (same output).

    reset: called when a forward pass begins and ends. take(z): what the canonizer knows about how z was made
    (a record a rule may use), or None.
    """

    functions: ClassVar[dict[Callable, Callable | None]] = {}

    def handle(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """The call's output (the call itself unless the canonizer replaces it)."""
        return func(*args, **kwargs)

    def reset(self) -> None:
        pass

    def take(self, z: Tensor) -> Any:
        return None


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

    def soft_relu_(self, z: Tensor, gate: Gate, channel_dim: int) -> Tensor:
        """The soft ReLU of z in place, recomputing z from this record in the backward."""
        return soft_relu_of_batch_norm(
            z, gate, self.x, self.mean, self.var, self.weight, self.bias, self.eps, self.addends, channel_dim
        )


def _add_stub(input, other, *, alpha=1):  # Tensor.add_(self, other, *, alpha=1)
    pass


class LeanBatchNorm(Canonizer):
    """Frozen eval-mode BatchNorm through ``frozen_batch_norm``; remembers the latest two outputs (two: a
    residual block's shortcut BatchNorm runs between the main branch's and its ReLU) and the residual sums
    added to them in place, for :meth:`take`."""

    functions: ClassVar[dict[Callable, Callable | None]] = {F.batch_norm: None, Tensor.add_: _add_stub}

    def __init__(self) -> None:
        self._made: list[_BatchNormOutput] = []

    def reset(self) -> None:
        self._made = []

    def handle(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if func is Tensor.add_:
            if not self._made:  # nothing pending: the add as it is, without binding its arguments
                return func(*args, **kwargs)
            return self._add_(Call.bind(func, args, kwargs, _add_stub))
        call = Call.bind(func, args, kwargs)
        w, b = call["weight"], call["bias"]
        frozen = not any(isinstance(p, Tensor) and p.requires_grad for p in (w, b))
        if call["training"] or call["running_mean"] is None or not frozen:
            return call.run()
        x, mean, var, eps = call["input"], call["running_mean"], call["running_var"], call["eps"]
        out = frozen_batch_norm(x, mean, var, w, b, eps)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._made = [*self._made[-1:], _BatchNormOutput(out, out._version, x, mean, var, w, b, eps)]
        return out

    def take(self, z: Tensor) -> _BatchNormOutput | None:
        """The record of z if z is a recent output unchanged since (then taken off the list)."""
        for i, made in enumerate(self._made):
            if z is made.z:
                del self._made[i]
                return made if z._version == made.version else None
        return None

    def _add_(self, call: Call) -> Tensor:
        """A residual sum added in place to a recent output is recorded with it."""
        z, other = call["input"], call["other"]
        made = self.take(z)
        out = call.run()
        same = isinstance(other, Tensor) and other.shape == z.shape and other.dtype == z.dtype
        if made and not call.kwargs and same:
            self._made.append(made._replace(version=z._version, addends=(*made.addends, other)))
        return out
