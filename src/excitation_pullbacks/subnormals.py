"""``no_subnormals()``: the backward of a pullback free of subnormal floats, the caller's float state kept.

Soft gates turn the exact zeros of the hard gate into tiny numbers: far below the threshold sigmoid(z / T)
and the products after it fall under 1.2e-38 (float32's smallest normal number), into subnormal floats, which
some x86 CPUs compute with many times more slowly (a convolution backward fed such gradients measured 3-6x
slower). Inside the block, flush-to-zero and denormals-are-zero are set on the calling thread and on every
thread of torch's intra-op OpenMP team, and each thread's own setting is restored on exit (also after an
exception), so a user who set ``torch.set_flush_denormal`` gets their state back unchanged.

What it changes: every float32 result below 1.2e-38 in magnitude becomes 0 (and such inputs read as 0), an
absolute change of at most 1.2e-38 per operation - below float32's rounding of any normal gradient entry.
float64 work is left alone (the block does nothing for it: its exactness tests keep their bits), as are
other devices. Where the CPU has no such flags or the native library is not built, the block does nothing;
``EXCITATION_PULLBACKS_FLUSH=0`` switches it off (the benchmark's diagnostic compares both).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .rules import pool_kernel

__all__ = ["no_subnormals"]


@contextmanager
def no_subnormals(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", enabled: bool = True):
    """Flush subnormals to zero for the block's CPU work in ``dtype`` (float32, float16, bfloat16); nothing for
    float64, other devices, or ``enabled=False``."""
    enabled = enabled and os.environ.get("EXCITATION_PULLBACKS_FLUSH", "1") != "0"
    if not enabled or torch.device(device).type != "cpu" or dtype == torch.float64:
        yield
        return
    saved = pool_kernel.denormals_off()
    try:
        yield
    finally:
        if saved is not None:
            pool_kernel.denormals_restore(saved)
