"""A compiled CPU kernel for the softmax-pool backward (the fast path of ``surrogates.soft_pool_backward``).

``pool_backward`` computes the input gradient in one pass over each output row's windows: the window max,
the exponentials e_j = exp((x_j - m) / T) and their sums stay in row buffers (in cache) and the input
gradient is accumulated directly, so the k_h * k_w-fold per-offset terms of the torch path never reach memory.

Plain C (no torch headers), compiled on first use with the system C compiler into a per-user cache (about a
second) and called through ctypes. The planes are split by OpenMP: the library needs ``libgomp.so.1``, which
is torch's own already loaded one, so the kernel shares torch's intra-op threads instead of competing with
them; where OpenMP cannot be linked the kernel runs on one thread.
Where it does not apply (no C compiler, another device or dtype, or ``EXCITATION_PULLBACKS_KERNELS=0``) it
returns None and the caller computes the same values in torch (tests compare them).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "pool_backward"]

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector exp (libmvec) for the loops along a row. */
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#define SIMD _Pragma("omp simd")
/* Elements below which a kernel runs on the calling thread alone. */
#define PARALLEL_MIN 65536

/* Input gradient of the softmax pool of x (planes x H x W, contiguous) for grad (planes x Ho x Wo); writes
   gin (planes x H x W). Plane p has temperature temps[p % nt]. Positions outside the input are excluded, or
   (zero != 0) enter as x = 0 while within the explicit padding. detach: gradient = weights; else the full
   gradient w_j (r_j + 1 - sum(e r) / Z). Returns nonzero when its row buffers could not be allocated. */
#define SOFT_POOL(NAME, T, EXP)                                                                          \
int NAME(const T *x, const T *grad, T *gin, const T *temps, int64_t nt, int64_t planes, int64_t H,      \
         int64_t W, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,  \
         int64_t pw, int64_t dh, int64_t dw, int zero, int detach) {                                     \
    int64_t K = kh * kw;                                                                                 \
    int failed = 0;                                                                                      \
    _Pragma("omp parallel if (planes * H * W >= PARALLEL_MIN) reduction(| : failed)")                    \
    {                                                                                                    \
    T *buf = (T *)malloc(sizeof(T) * (size_t)Wo * (size_t)(2 * K + 4));                                  \
    int64_t *lo = (int64_t *)malloc(sizeof(int64_t) * (size_t)(4 * kw));                                \
    int ok = buf != NULL && lo != NULL;                                                                  \
    failed |= !ok;                                                                                       \
    for (int64_t j = 0; ok && j < kw; j++) { /* ow ranges whose column is in the input / the padding */  \
        int64_t off = j * dw - pw, a = 0, b = 0, za = 0, zb = 0;                                         \
        while (a < Wo && a * sw + off < 0) a++;                                                          \
        b = a; while (b < Wo && b * sw + off < W) b++;                                                   \
        while (za < Wo && za * sw + off < -pw) za++;                                                     \
        zb = za; while (zb < Wo && zb * sw + off < W + pw) zb++;                                         \
        lo[j] = a; lo[kw + j] = b; lo[2 * kw + j] = za; lo[3 * kw + j] = zb;                             \
    }                                                                                                    \
    _Pragma("omp for schedule(static)")                                                                  \
    for (int64_t p = 0; p < planes; p++) {                                                               \
        if (!ok) continue;                                                                               \
        T *m = buf, *Z = buf + Wo, *S = buf + 2 * Wo, *C = buf + 3 * Wo, *E = buf + 4 * Wo;              \
        T *R = E + K * Wo;                                                                               \
        int64_t *hi = lo + kw, *zlo = lo + 2 * kw, *zhi = lo + 3 * kw;                                   \
        const T *xp = x + p * H * W, *gp = grad + p * Ho * Wo;                                           \
        T *op = gin + p * H * W;                                                                         \
        T inv = (T)1 / temps[p % nt];                                                                    \
        memset(op, 0, sizeof(T) * (size_t)(H * W));                                                      \
        for (int64_t oh = 0; oh < Ho; oh++) {                                                            \
            for (int64_t ow = 0; ow < Wo; ow++) { m[ow] = -INFINITY; Z[ow] = 0; S[ow] = 0; }             \
            for (int64_t i = 0; i < kh; i++) {                                                           \
                int64_t r = oh * sh - ph + i * dh;                                                       \
                int inside = r >= 0 && r < H, padrow = zero && r >= -ph && r < H + ph;                   \
                for (int64_t j = 0; j < kw; j++) {                                                       \
                    if (inside) {                                                                        \
                        const T *row = xp + r * W + j * dw - pw;                                         \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++) {                                \
                            T v = row[ow * sw]; m[ow] = v > m[ow] ? v : m[ow];                           \
                        }                                                                                \
                    }                                                                                    \
                    if (padrow) {                                                                        \
                        for (int64_t ow = zlo[j]; ow < zhi[j]; ow++)                                     \
                            if (!inside || ow < lo[j] || ow >= hi[j]) m[ow] = m[ow] > 0 ? m[ow] : 0;     \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int64_t i = 0; i < kh; i++) {                                                           \
                int64_t r = oh * sh - ph + i * dh;                                                       \
                int inside = r >= 0 && r < H, padrow = zero && r >= -ph && r < H + ph;                   \
                for (int64_t j = 0; j < kw; j++) {                                                       \
                    T *e = E + (i * kw + j) * Wo, *q = R + (i * kw + j) * Wo;                            \
                    if (inside) {                                                                        \
                        const T *row = xp + r * W + j * dw - pw;                                         \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++) {                                \
                            T u = (row[ow * sw] - m[ow]) * inv, v = EXP(u);                              \
                            q[ow] = u; e[ow] = v; Z[ow] += v; S[ow] += v * u;                            \
                        }                                                                                \
                    }                                                                                    \
                    if (padrow) {                                                                        \
                        for (int64_t ow = zlo[j]; ow < zhi[j]; ow++)                                     \
                            if (!inside || ow < lo[j] || ow >= hi[j]) {                                  \
                                T u = -m[ow] * inv, v = EXP(u);                                          \
                                Z[ow] += v; S[ow] += v * u;                                              \
                            }                                                                            \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int64_t ow = 0; ow < Wo; ow++) {                                                        \
                C[ow] = gp[oh * Wo + ow] / Z[ow];                                                        \
                S[ow] = detach ? 0 : 1 - S[ow] / Z[ow];                                                  \
            }                                                                                            \
            for (int64_t i = 0; i < kh; i++) {                                                           \
                int64_t r = oh * sh - ph + i * dh;                                                       \
                if (r < 0 || r >= H) continue;                                                           \
                for (int64_t j = 0; j < kw; j++) {                                                       \
                    T *e = E + (i * kw + j) * Wo, *q = R + (i * kw + j) * Wo;                            \
                    T *row = op + r * W + j * dw - pw;                                                   \
                    if (detach) {                                                                        \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++) row[ow * sw] += e[ow] * C[ow];   \
                    } else {                                                                             \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++)                                  \
                            row[ow * sw] += e[ow] * C[ow] * (q[ow] + S[ow]);                             \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    free(buf); free(lo);                                                                                 \
    }                                                                                                    \
    return failed;                                                                                       \
}

SOFT_POOL(soft_pool_f32, float, expf)
SOFT_POOL(soft_pool_f64, double, exp)
"""

_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
#: Builds tried in turn: for this machine's CPU (e.g. 8-wide AVX2 exp), with OpenMP threads and glibc's
#: vector exp; the same for any CPU of the architecture; the vector exp alone; plain C.
_BUILDS = (
    (("-march=native", "-fopenmp"), ("-lmvec", "-lm")),
    (("-fopenmp",), ("-lmvec", "-lm")),
    (("-fopenmp-simd",), ("-lmvec", "-lm")),
    ((), ("-lm",)),
)
_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 14 + [ctypes.c_int] * 2
_FUNCS = {torch.float32: "soft_pool_f32", torch.float64: "soft_pool_f64"}
_lib: ctypes.CDLL | None = None
_failed: str | None = None


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


def _build() -> ctypes.CDLL:
    """Compile (once per source, compiler and machine) and load the shared library."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = "\0".join((_SOURCE, cc, *_FLAGS, repr(_BUILDS), platform.machine(), sys.platform, _cpu()))
    key = hashlib.sha256(key.encode()).hexdigest()
    path = _cache_dir() / f"kernels_{key[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, lib = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(_SOURCE)
            for flags, libs in _BUILDS:
                done = subprocess.run(
                    [cc, *_FLAGS, *flags, str(src), "-o", str(lib), *libs],
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
    return lib


def available() -> bool:
    """True when the kernel is built and loaded (builds it on the first call); False when it is switched
    off (``EXCITATION_PULLBACKS_KERNELS=0``) or cannot be built (the reason is logged once)."""
    global _lib, _failed
    if os.environ.get("EXCITATION_PULLBACKS_KERNELS", "1") == "0":
        return False
    if _lib is None and _failed is None:
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _failed = str(err)
            log.info("soft-pool kernel unavailable, using the torch path: %s", err)
    return _lib is not None


def _temperatures(t, channels: int, dtype) -> Tensor | None:
    """The per-plane-channel temperatures as a contiguous CPU tensor, or None where the kernel does not
    apply (a temperature of 0 or inf, or not one per channel)."""
    if isinstance(t, Tensor):
        t = t.detach().reshape(-1)
        if t.numel() not in (1, channels) or not bool(((t > 0) & torch.isfinite(t)).all()):
            return None
        return t.to(device="cpu", dtype=dtype).contiguous()
    if not (0 < t < math.inf):
        return None
    return torch.tensor([t], dtype=dtype)


def pool_backward(x: Tensor, grad: Tensor, t, k, s, p, d, zero: bool, detach: bool) -> Tensor | None:
    """The softmax-pool input gradient (see ``surrogates.soft_pool_backward``), or None where the kernel
    does not apply (then the caller computes it in torch).

    x: (N, C, H, W) pool input; grad: (N, C, Ho, Wo); t: temperature (float, or (C,) tensor); k, s, p, d:
    2-tuples of kernel, stride, padding, dilation; zero: padding enters as zeros (else excluded).
    Returns (N, C, H, W).
    """
    if x.device.type != "cpu" or x.dtype not in _FUNCS or grad.dtype != x.dtype or torch.compiler.is_compiling():
        return None
    n, c, h, w = x.shape
    temps = _temperatures(t, c, x.dtype)
    if temps is None or x.numel() == 0 or grad.numel() == 0 or not available():
        return None
    ho, wo = grad.shape[-2:]
    x, grad = x.contiguous(), grad.contiguous()
    result = torch.empty((n, c, h, w), dtype=x.dtype)
    fn = getattr(_lib, _FUNCS[x.dtype])
    geometry = (h, w, ho, wo, *k, *s, *p, *d, int(zero), int(detach))
    code = fn(x.data_ptr(), grad.data_ptr(), result.data_ptr(), temps.data_ptr(), temps.numel(), n * c, *geometry)
    if code:
        raise MemoryError("soft-pool kernel: out of memory for its row buffers")
    return result
