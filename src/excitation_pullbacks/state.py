"""Leaving the user's model as it was: every buffer, every parameter's ``requires_grad`` flag and every
module's ``training`` flag are restored after the core runs the model.

In eval mode a forward pass writes nothing; in train mode BatchNorm normalises with the batch's statistics
(that is what the forward pass computes, and the result then depends on the other images in the batch) and
updates its running statistics and ``num_batches_tracked`` - :func:`preserved_model` puts those back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

__all__ = ["keeps_model", "preserved_model"]

F = TypeVar("F", bound=Callable)


@contextmanager
def preserved_model(model: nn.Module, *, freeze: bool = False) -> Iterator[nn.Module]:
    """Run the block on ``model``, then restore its buffers (values and objects), parameters' requires_grad
    flags and modules' training flags, also after an exception. Buffers are cloned once per block (for a
    ResNet50 about 50k numbers); values equal to the snapshot are left untouched, so eval-mode results and
    models are bit-identical. freeze: also set requires_grad=False on every parameter for the block (the
    core's pullbacks: no weight gradients), restored with the rest.

    One walk of the module tree serves all three, and only flags that differ are set back (a batch-1 pullback
    of a small model spends as long here as in a layer)."""
    if not isinstance(model, nn.Module):
        yield model
        return
    modules = list(model.modules())
    modes = [m.training for m in modules]
    buffers = [(m, name, b, b.clone()) for m in modules for name, b in m._buffers.items() if b is not None]
    # a parameter shared by two modules appears twice: both entries hold its flag from before the block
    params = [(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
    try:
        if freeze:
            for p, _ in params:
                p.requires_grad_(False)
        yield model
    finally:
        with torch.no_grad():
            for m, name, original, copy in buffers:
                if m._buffers.get(name) is not original:
                    m._buffers[name] = original
                if not torch.equal(original, copy):
                    original.copy_(copy)
        for p, flag in params:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, training in zip(modules, modes):
            if m.training != training:
                m.training = training


def keeps_model(fn: F) -> F:
    """Decorator: ``fn(model, ...)`` (model first, or the keyword ``model``) runs inside
    :func:`preserved_model`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        with preserved_model(model):
            return fn(*args, **kwargs)

    return wrapper
