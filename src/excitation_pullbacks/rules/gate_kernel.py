"""The normal-CDF gate's backward, grad * Phi(z / T), in one CPU pass (``gate_kernel.c``).

:func:`normal_cdf_grad` returns it, or None where the kernel does not apply; the caller then computes the same
values with torch ops (``Gate.__call__``: a pass per operation). The kernel is built into the soft-pool
kernel's library (:mod:`~excitation_pullbacks.rules.pool_kernel`). It evaluates Phi(u) as erfc(-u / sqrt 2) / 2
where torch's ``ndtr`` takes (1 + erf(u / sqrt 2)) / 2: the two agree to a few ulps of the gate's value near
and above 0 and to 1e-6 (float32) / 1e-15 (float64) absolute below, where the erfc form keeps the tail
that 1 + erf rounds to 0 (tests compare them).
"""

from __future__ import annotations

import ctypes
import math
import os

import torch
from torch import Tensor

from ..gates import Gate
from ..tracing import KERNEL_OPS, capturing
from . import pool_kernel

__all__ = ["calls", "normal_cdf_grad"]

_FUNCS = {torch.float32: "normal_cdf_gate_f32", torch.float64: "normal_cdf_gate_f64"}
_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_double] * 3
#: erfc's argument range: below it the gate is 1 (to the dtype's rounding), above it 0 (erfc is below the
#: smallest normal number there)
RANGE = {torch.float32: (-4.0, 9.0), torch.float64: (-6.0, 26.5)}
#: Calls of the kernel in this process (tests count them).
calls = 0


def normal_cdf_grad(grad: Tensor, z: Tensor, gate: Gate) -> Tensor | None:
    """grad * Phi(z / T) for a ``normal_cdf`` gate at one finite T > 0, or None where the kernel does not
    apply: another gate or a per-channel T, not CPU float32/float64, grad and z not contiguous and of one shape
    and dtype, while torch.compile traces, ``EXCITATION_PULLBACKS_GATE_KERNEL=0``, or no kernel library.

    grad, z: any shape (the same). Returns a new tensor of that shape.
    """
    t = gate.temperature
    if (
        gate.shape != "normal_cdf"
        or isinstance(t, Tensor)
        or not 0 < t < math.inf
        or z.dtype not in _FUNCS
        or grad.dtype != z.dtype
        or grad.shape != z.shape
        or z.device.type != "cpu"
        or grad.device.type != "cpu"
        or not (z.is_contiguous() and grad.is_contiguous())
        or torch.compiler.is_compiling()  # the torch path
        or os.environ.get("EXCITATION_PULLBACKS_GATE_KERNEL", "1") == "0"
    ):
        return None
    if pool_kernel.function(_FUNCS[z.dtype], _ARGS, None) is None:
        return None
    kernel = normal_cdf_gate_grad if capturing() else _run
    return kernel(z, grad, -1.0 / (t * math.sqrt(2.0)))


def _run(z: Tensor, grad: Tensor, scale: float) -> Tensor:
    """The kernel on contiguous CPU tensors of one shape and dtype: grad * erfc(z * scale) / 2, a new tensor."""
    global calls
    calls += 1
    out = torch.empty_like(z, memory_format=torch.contiguous_format)
    fn = pool_kernel.function(_FUNCS[z.dtype], _ARGS, None)
    fn(z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), scale, *RANGE[z.dtype])
    return out


@torch.library.custom_op("excitation_pullbacks::normal_cdf_gate_grad", mutates_args=(), device_types="cpu")
def normal_cdf_gate_grad(z: Tensor, grad: Tensor, scale: float) -> Tensor:
    """The kernel as an op, for graphs that trace it (a replay capture); see ``_run``."""
    return _run(z, grad, scale)


@normal_cdf_gate_grad.register_fake
def _(z, grad, scale):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


KERNEL_OPS[torch.ops.excitation_pullbacks.normal_cdf_gate_grad.default] = _run
