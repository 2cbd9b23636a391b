"""Whether a graph is being traced: ``torch.compile`` (Dynamo) or a :mod:`~excitation_pullbacks.replay` capture.

While one is, tensors may hold no data (fake tensors): the rules read no values back and call no kernel on data
pointers. Under ``torch.compile`` they take their torch paths or the pool kernel's op; in a capture each kernel
runs as its custom op (listed in :data:`KERNEL_OPS`), which the replayed graph then calls without the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["KERNEL_OPS", "capture", "capturing", "tracing"]

_capturing: ContextVar[bool] = ContextVar("excitation_pullbacks_capturing", default=False)

#: {a kernel's custom op (its OpOverload): the op's body}, filled by the kernel modules as they register them.
KERNEL_OPS: dict[object, Callable] = {}


def capturing() -> bool:
    """True inside :func:`capture`."""
    return _capturing.get()


def tracing() -> bool:
    """True inside ``torch.compile``'s tracing or a replay capture."""
    return _capturing.get() or torch.compiler.is_compiling()


@contextmanager
def capture() -> Iterator[None]:
    """Marks the calls inside as a replay capture (see :func:`capturing`)."""
    token = _capturing.set(True)
    try:
        yield
    finally:
        _capturing.reset(token)
