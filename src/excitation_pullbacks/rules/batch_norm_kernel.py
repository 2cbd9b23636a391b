"""The backward of the in-place soft ReLU of a frozen BatchNorm output in one CPU pass (``batch_norm_kernel.c``).

:func:`soft_relu_grad` returns grad * sigmoid(z / T) for z = batch_norm(x) (+ one addend), recomputing z
inside the pass, or None where the kernel does not apply; the caller then computes the same values with torch
ops (a batch_norm recompute pass and a softplus-backward pass). The kernel is built into the soft-pool
kernel's library (:mod:`~excitation_pullbacks.rules.pool_kernel`, same cache, compiler and OpenMP runtime).

How close to the torch path: z is recomputed with the forward's operations, each rounded on its own (on this
package's test machine bit for bit the forward's z); the exponential is glibc's vector exp instead of
torch's, which differ by an ulp or two, so the gate and the gradient agree with the torch path to a few ulps
(tests bound it: 1e-6 relative in float32, 1e-14 in float64). Where z / T <= -87 (float32; -708 in float64)
the gate is 0 instead of a number below exp(-87) = 1.6e-38 (exp(-708) = 3.3e-308): the products would be
subnormal, which the backward's flush makes 0 anyway (and glibc's vector exp would leave its fast path for
such arguments).
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

__all__ = ["calls", "soft_relu_grad"]

_FUNCS = {torch.float32: "bn_soft_relu_f32", torch.float64: "bn_soft_relu_f64"}
_ARGS = [ctypes.c_void_p] * 7 + [ctypes.c_double] * 3 + [ctypes.c_int64] * 3
#: Above z / T = threshold the gate is 1 to the dtype's precision (as the softplus backward's threshold).
THRESHOLD = {torch.float32: 20.0, torch.float64: 40.0}
#: At and below z / T = LOW the gate is 0: exp(LOW) is about the dtype's smallest normal number.
LOW = {torch.float32: -87.0, torch.float64: -708.0}
#: Calls of the kernel in this process (tests count them).
calls = 0


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def soft_relu_grad(
    grad: Tensor, gate: Gate, x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float, addends: tuple
) -> Tensor | None:
    """grad * sigmoid(z / T) for z = F.batch_norm(x, mean, var, weight, bias, eps=eps) + sum(addends), or None
    where the kernel does not apply: not CPU float32/float64, a gate other than a sigmoid at one finite T > 0,
    more than one addend, a tensor not contiguous or of another dtype, or no kernel library.

    grad, x, addends: (N, C, ...) of one shape; mean, var, weight, bias: (C,) (weight, bias may be None).
    Returns a new (N, C, ...) tensor.
    """
    t = gate.temperature
    dtype = x.dtype
    if (
        os.environ.get("EXCITATION_PULLBACKS_BN_KERNEL", "1") == "0"
        or dtype not in _FUNCS
        or gate.shape != "sigmoid"
        or isinstance(t, Tensor)
        or not 0 < t < math.inf
        or len(addends) > 1
        or x.dim() < 2
        or x.numel() == 0
        or torch.compiler.is_compiling()  # the torch path
    ):
        return None
    tensors = (grad, x, *addends)
    params = tuple(p for p in (mean, var, weight, bias) if p is not None)
    if any(v.device.type != "cpu" or v.dtype != dtype or not v.is_contiguous() for v in tensors + params):
        return None
    if any(v.shape != x.shape for v in tensors) or any(p.shape != (x.shape[1],) for p in params):
        return None
    if pool_kernel.function(_FUNCS[dtype], _ARGS, ctypes.c_int) is None:
        return None
    alpha = torch.rsqrt(var + eps)  # the forward's scale, op for op as ATen's eval-mode batch_norm
    if weight is not None:
        alpha = alpha * weight
    kernel = soft_relu_batch_norm_grad if capturing() else _run
    return kernel(x, addends[0] if addends else None, grad, alpha, mean, bias, 1.0 / t)


def _run(
    x: Tensor, addend: Tensor | None, grad: Tensor, alpha: Tensor, mean: Tensor, bias: Tensor | None, inv_t: float
) -> Tensor:
    """The kernel on contiguous CPU tensors of x's dtype: x, addend, grad (N, C, ...); alpha, mean, bias (C,).
    Returns grad * sigmoid(z * inv_t) for z = (x - mean) * alpha + bias (+ addend), a new (N, C, ...) tensor."""
    global calls
    calls += 1
    fn = pool_kernel.function(_FUNCS[x.dtype], _ARGS, ctypes.c_int)
    result = torch.empty_like(x, memory_format=torch.contiguous_format)
    n, c = x.shape[:2]
    if fn(
        x.data_ptr(), _pointer(addend), grad.data_ptr(), result.data_ptr(), alpha.data_ptr(), mean.data_ptr(),
        _pointer(bias), inv_t, THRESHOLD[x.dtype], LOW[x.dtype], n, c, x[0, 0].numel(),
    ):  # fmt: skip
        raise MemoryError("batch-norm soft-ReLU kernel: out of memory for its channel buffer")
    return result


@torch.library.custom_op("excitation_pullbacks::soft_relu_batch_norm_grad", mutates_args=(), device_types="cpu")
def soft_relu_batch_norm_grad(
    x: Tensor, addend: Tensor | None, grad: Tensor, alpha: Tensor, mean: Tensor, bias: Tensor | None, inv_t: float
) -> Tensor:
    """The kernel as an op, for graphs that trace it (a replay capture); see ``_run``."""
    return _run(x, addend, grad, alpha, mean, bias, inv_t)


@soft_relu_batch_norm_grad.register_fake
def _(x, addend, grad, alpha, mean, bias, inv_t):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


KERNEL_OPS[torch.ops.excitation_pullbacks.soft_relu_batch_norm_grad.default] = _run
