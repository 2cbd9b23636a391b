"""The softmax-pool backward's CPU kernel as the custom op ``excitation_pullbacks::soft_pool_backward``.

The C source (``pool_kernel.c`` beside this file, with the other kernels' sources, ``SOURCES``) is compiled on first
use by the system C compiler into one library in a per-user cache (about a second; the file name hashes the sources,
compiler, flags, CPU and OpenMP runtime) and called through ctypes. It is registered with ``torch.library`` (with a
fake implementation for tracing), so a ``torch.compile``d backward calls it like any op instead of stepping aside;
eager backward passes call the kernel without the op's dispatch.

OpenMP: the library is linked against the OpenMP runtime that torch itself has loaded (read from the
process's memory map - ``libgomp.so.1``, or a wheel's renamed ``libgomp-<hash>.so.1``, or ``libiomp5``), so
one runtime is mapped and ``torch.set_num_threads`` governs the kernel's threads. Where none is found it is
built without OpenMP threads (vectorised only) rather than load a second runtime.
Where the kernel does not apply (no C compiler, another device or dtype, or ``EXCITATION_PULLBACKS_KERNELS=0``)
:func:`pool_backward` returns None and the caller computes the same values in torch (tests compare them).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..tracing import KERNEL_OPS, tracing

__all__ = [
    "SOURCE",
    "available",
    "calls",
    "denormals_flushed",
    "denormals_off",
    "denormals_restore",
    "function",
    "openmp_runtime",
    "pool_backward",
    "run",
    "soft_pool_backward",
    "threads",
]

log = logging.getLogger(__name__)

#: The C source shipped with the package.
SOURCE = Path(__file__).with_name("pool_kernel.c")
#: Every C source of the library, built and loaded together: this kernel's, the BatchNorm soft-ReLU kernel's
#: (:mod:`~excitation_pullbacks.rules.batch_norm_kernel`) and the normal-CDF gate's
#: (:mod:`~excitation_pullbacks.rules.gate_kernel`).
SOURCES = (SOURCE, *(Path(__file__).with_name(f"{name}.c") for name in ("batch_norm_kernel", "gate_kernel")))
# -ffp-contract=off: no fused multiply-adds the source does not write, so results round as torch's ops do
_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 14 + [ctypes.c_int] * 2
_FUNCS = {torch.float32: "soft_pool_f32", torch.float64: "soft_pool_f64"}
_lib: ctypes.CDLL | None = None
_declared: dict[str, object] = {}  # the functions function() declared, by name
_failed: str | None = None
#: Calls of the op's kernel in this process (tests count them, e.g. in a compiled graph).
calls = 0


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "excitation_pullbacks"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu() -> str:
    """The CPU's model and feature flags (part of the cache key: the library is built for this CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def openmp_runtime() -> str | None:
    """The path of torch's own OpenMP runtime as mapped in this process, or None.

    Other packages may map their own (scikit-learn ships a renamed libgomp): the one inside torch's folder
    wins, else the system's ``libgomp.so.1`` / ``libiomp5.so`` / ``libomp.so`` that torch links."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    found = sorted(set(re.findall(r"(/\S*/lib(?:gomp|iomp5|omp)[-\w.]*\.so[.\d]*)\s*$", maps, re.MULTILINE)))
    here = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    own = [p for p in found if os.path.realpath(p).startswith(here)]
    plain = [p for p in found if os.path.basename(p) in ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.so.5")]
    return (own or plain or [None])[0]


def _builds(omp: str | None) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(compile flags, link inputs) tried in turn: for this CPU with OpenMP threads from torch's runtime and
    glibc's vector exp, in 512-bit vectors where it has them (AVX-512: the BatchNorm kernel measured 2.0 against
    2.5-2.9 ms on 6.4M floats in 256-bit ones; ignored elsewhere); the same in the compiler's default width;
    for any CPU of the architecture; vectorised only; plain C."""
    builds = []
    if omp is not None:
        link = (omp, f"-Wl,-rpath,{os.path.dirname(omp)}", "-lmvec", "-lm")
        builds += [
            (("-march=native", "-mprefer-vector-width=512", "-fopenmp"), link),
            (("-march=native", "-fopenmp"), link),
            (("-fopenmp",), link),
        ]
    return [*builds, (("-fopenmp-simd",), ("-lmvec", "-lm")), ((), ("-lm",))]


def _build() -> ctypes.CDLL:
    """Compile (once per source, compiler, machine and OpenMP runtime) and load the shared library."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    sources = [path.read_text() for path in SOURCES]
    omp = openmp_runtime()
    builds = _builds(omp)
    key = "\0".join((*sources, cc, *_FLAGS, repr(builds), platform.machine(), sys.platform, _cpu()))
    path = _cache_dir() / f"pool_kernel_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            lib = Path(tmp) / "pool_kernel.so"
            for flags, libs in builds:
                done = subprocess.run(
                    [cc, *_FLAGS, *flags, *map(str, SOURCES), "-o", str(lib), *libs],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if done.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:500]}")
            os.replace(lib, path)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(path))
    for name in _FUNCS.values():
        getattr(lib, name).argtypes = _ARGS
        getattr(lib, name).restype = ctypes.c_int
    lib.soft_pool_threads.argtypes, lib.soft_pool_threads.restype = [], ctypes.c_int
    lib.denormals_off.argtypes, lib.denormals_off.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    lib.denormals_restore.argtypes, lib.denormals_restore.restype = [ctypes.c_void_p, ctypes.c_int], None
    lib.denormals_state.argtypes, lib.denormals_state.restype = [], ctypes.c_uint
    return lib


def function(name: str, argtypes: list, restype):
    """The library's C function ``name`` with its signature declared (once), for the other kernels built into
    it; None where :func:`available` is False."""
    if not available():
        return None
    fn = _declared.get(name)
    if fn is None:
        fn = getattr(_lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        _declared[name] = fn
    return fn


def threads() -> int:
    """Threads the kernel's parallel regions run on now (1 without OpenMP); needs :func:`available`."""
    if not available():
        raise RuntimeError(f"the soft-pool kernel is not available: {_failed or 'switched off'}")
    return int(_lib.soft_pool_threads())


def available() -> bool:
    """True when the kernel is built and loaded (builds it on the first call, except while torch.compile traces:
    the rule's ``prepare`` builds it before); False when it is switched off (``EXCITATION_PULLBACKS_KERNELS=0``)
    or cannot be built (the reason is logged once)."""
    global _lib, _failed
    if os.environ.get("EXCITATION_PULLBACKS_KERNELS", "1") == "0":
        return False
    if _lib is None and _failed is None and not tracing():  # no build inside a graph
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _failed = str(err)
            log.info("soft-pool kernel unavailable, using the torch path: %s", err)
    return _lib is not None


#: Control-word slots for :func:`denormals_off` (threads of one OpenMP team at most).
_MAX_THREADS = 1024


def denormals_off() -> ctypes.Array | None:
    """Set flush-to-zero and denormals-are-zero on the calling thread and every thread of its OpenMP team (the
    threads torch's intra-op parallel regions run on); returns the saved control words for
    :func:`denormals_restore`, or None where this does not apply (no kernel library, not x86)."""
    if not available():
        return None
    saved = (ctypes.c_uint * _MAX_THREADS)()
    return saved if _lib.denormals_off(saved, _MAX_THREADS) else None


def denormals_restore(saved: ctypes.Array) -> None:
    """Put back the control words :func:`denormals_off` saved, thread by thread."""
    _lib.denormals_restore(saved, _MAX_THREADS)


def denormals_flushed() -> bool | None:
    """Whether flush-to-zero and denormals-are-zero are both set on the calling thread (None: unknown here)."""
    if not available():
        return None
    return _lib.denormals_state() == 0x8040


def run(x: Tensor, grad: Tensor, temperatures: Tensor, geometry: list[int], zero: bool, detach: bool) -> Tensor:
    """The kernel on the op's arguments (see :func:`soft_pool_backward`): the op's body, and the eager path,
    which calls it without the op's dispatch (tens of microseconds per call, a batch-1 pullback's scale)."""
    global calls
    calls += 1
    if not available():
        raise RuntimeError(f"the soft-pool kernel is not available: {_failed or 'switched off'}")
    n, c, h, w = x.shape
    ho, wo = grad.shape[-2:]
    x, grad, temps = x.contiguous(), grad.contiguous(), temperatures.to(x.dtype).contiguous()
    result = torch.empty((n, c, h, w), dtype=x.dtype)
    if result.numel() == 0:
        return result
    fn = getattr(_lib, _FUNCS[x.dtype])
    code = fn(
        x.data_ptr(), grad.data_ptr(), result.data_ptr(), temps.data_ptr(), temps.numel(), n * c, h, w, ho, wo,
        *geometry, int(zero), int(detach),
    )  # fmt: skip
    if code:
        raise MemoryError("soft-pool kernel: out of memory for its row buffers")
    return result


@torch.library.custom_op("excitation_pullbacks::soft_pool_backward", mutates_args=(), device_types="cpu")
def soft_pool_backward(
    x: Tensor, grad: Tensor, temperatures: Tensor, geometry: list[int], zero: bool, detach: bool
) -> Tensor:
    """The softmax-pool input gradient on CPU (see ``rules.pool.soft_pool_backward``).

    x: (N, C, H, W) float32/float64; grad: (N, C, Ho, Wo) same dtype; temperatures: (1,) or (C,) > 0, finite;
    geometry: [kh, kw, sh, sw, ph, pw, dh, dw]; zero: padding enters as zeros (else excluded); detach: the
    gradient is the softmax weights alone. Returns (N, C, H, W). Needs :func:`available`.
    """
    return run(x, grad, temperatures, geometry, zero, detach)


@soft_pool_backward.register_fake
def _(x, grad, temperatures, geometry, zero, detach):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


KERNEL_OPS[torch.ops.excitation_pullbacks.soft_pool_backward.default] = run


def _temperatures(t, channels: int, dtype) -> Tensor | None:
    """The per-plane-channel temperatures as a contiguous CPU tensor, or None where the kernel does not
    apply (a temperature of 0 or inf, or not one per channel)."""
    if isinstance(t, Tensor):
        if tracing():  # checking the values would read them back: the torch path
            return None
        t = t.detach().reshape(-1)
        if t.numel() not in (1, channels) or not bool(((t > 0) & torch.isfinite(t)).all()):
            return None
        return t.to(device="cpu", dtype=dtype)
    if not (0 < t < math.inf):
        return None
    return torch.full((1,), t, dtype=dtype)


def pool_backward(x: Tensor, grad: Tensor, t, k, s, p, d, zero: bool, detach: bool) -> Tensor | None:
    """The softmax-pool input gradient through the op, or None where the kernel does not apply (then the caller
    computes it in torch).

    x: (N, C, H, W) pool input; grad: (N, C, Ho, Wo); t: temperature (float, or (C,) tensor); k, s, p, d:
    2-tuples of kernel, stride, padding, dilation; zero: padding enters as zeros (else excluded).
    Returns (N, C, H, W).
    """
    if x.device.type != "cpu" or x.dtype not in _FUNCS or grad.dtype != x.dtype:
        return None
    temps = _temperatures(t, x.shape[1], x.dtype)
    if temps is None or x.numel() == 0 or grad.numel() == 0 or not available():
        return None
    op = soft_pool_backward if tracing() else run  # the op only where a graph traces it
    return op(x, grad, temps, [*k, *s, *p, *d], zero, detach)
