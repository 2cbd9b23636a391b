"""Gating-induced networks (paper Sec. 2.3): a model's forward with its gates taken from a given gating.

A gating Lambda fixes, per call site and input, what each ReLU multiplies its pre-activation by and which
window entries each max-pool passes on. The Lambda-induced network f_Lambda runs the model's own layers
but replaces ``relu(z)`` by ``lambda * z`` and ``max(window)`` by ``sum_j w_j window_j`` with the gating's
lambda and w (eq. 4): for binary gates recorded from the model itself f_G = f (bit for bit); binary gates
recorded from another parameter state (a checkpoint) on the same inputs give f_pi of Hypothesis 1; soft
gates sigma(z / T) of the model's own pre-activations give f_Gamma, whose input gradient with the gates
held fixed is the excitation pullback (with detached max-pool weights).

:class:`Gating` holds the gates of one batch per call site (``Site.key``, in forward order): binary ReLU
gates as ``bool`` (``packed`` turns them into bits), max-pool gates as the argmax position (an index into
the input's H * W), soft gates as floats (ReLU) or window weights (max-pool).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gating import Excitation, PoolArgs
from .options import as_schedule
from .schedules import Schedule
from .sites import Site

__all__ = [
    "Gating",
    "gating_induced",
    "induced_forward",
    "pack_bits",
    "pool_one_hot",
    "pool_slots",
    "record_gates",
    "soft_gates",
    "unpack_bits",
]


def _pair(v, default=None) -> tuple[int, int]:
    if v is None:
        v = default
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _geometry(pool: PoolArgs) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation) as pairs; stride defaults to the kernel, as in F.max_pool2d."""
    k = _pair(pool.kernel_size)
    s = _pair(pool.stride, k) if pool.stride not in (None, (), []) else k
    return k, s, _pair(pool.padding), _pair(pool.dilation)


def _windows(z: Tensor, pool: PoolArgs, fill: float) -> Tensor:
    """z (N, C, H, W) -> its pooling windows (N, C, K, Ho, Wo), K = kh * kw, padding filled with ``fill``."""
    if pool.ceil_mode:
        raise ValueError("soft max-pool gates need ceil_mode=False")
    k, s, p, d = _geometry(pool)
    n, c, h, w = z.shape
    zp = F.pad(z, (p[1], p[1], p[0], p[0]), value=fill) if any(p) else z
    cols = F.unfold(zp.reshape(n * c, 1, *zp.shape[-2:]), k, dilation=d, stride=s)  # (N*C, K, L)
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return cols.view(n, c, k[0] * k[1], ho, wo)


def pool_slots(indices: Tensor, pool: PoolArgs, in_hw: tuple[int, int]) -> Tensor:
    """Argmax positions (N, C, Ho, Wo), indices into the input's H * W -> their slot in the window (N, C, 1,
    Ho, Wo) int64 in [0, K), K = kh * kw, the window layout of soft max-pool gates."""
    k, s, p, d = _geometry(pool)
    ho, wo = indices.shape[-2:]
    row, col = indices // in_hw[1], indices % in_hw[1]
    top = torch.arange(ho, device=indices.device).view(-1, 1) * s[0] - p[0]
    left = torch.arange(wo, device=indices.device).view(1, -1) * s[1] - p[1]
    return (((row - top) // d[0]) * k[1] + (col - left) // d[1]).unsqueeze(2)


def pool_one_hot(indices: Tensor, pool: PoolArgs, in_hw: tuple[int, int], dtype=torch.float32) -> Tensor:
    """Argmax positions (N, C, Ho, Wo), indices into the input's H * W -> one-hot window weights
    (N, C, K, Ho, Wo), K = kh * kw, the layout :func:`soft_gates` gives max-pool sites."""
    k = _geometry(pool)[0]
    out = torch.zeros(*indices.shape[:2], k[0] * k[1], *indices.shape[-2:], dtype=dtype, device=indices.device)
    return out.scatter_(2, pool_slots(indices, pool, in_hw), 1.0)


def pack_bits(bits: Tensor) -> Tensor:
    """A bool tensor -> its entries as bits, (ceil(numel / 8),) uint8, first entry in the highest bit."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`pack_bits`: (ceil(numel / 8),) uint8 -> a bool tensor of ``shape``."""
    n = 1
    for dim in shape:
        n *= int(dim)
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


@dataclass
class Gating:
    """The gates of one batch of N inputs, per call site key in forward order.

    relu: {key: (N, ...) bool (binary gates 1[z > 0]) or float in [0, 1] (soft gates)}, shaped like z.
    pool: {key: (N, C, Ho, Wo) int64 argmax positions into the input's H * W (binary), or (N, C, K, Ho, Wo)
        float window weights, K = kh * kw, each window summing to 1 (soft)}.
    pool_args: {key: PoolArgs}, pool_inputs: {key: (H, W)} of each max-pool call (to read the gates back).
    output: the model's output on the batch when the gates were recorded (detached), or None.
    """

    relu: dict[str, Tensor] = field(default_factory=dict)
    pool: dict[str, Tensor] = field(default_factory=dict)
    pool_args: dict[str, PoolArgs] = field(default_factory=dict)
    pool_inputs: dict[str, tuple[int, int]] = field(default_factory=dict)
    output: Tensor | None = None

    @property
    def keys(self) -> list[str]:
        """ReLU then max-pool site keys (each in forward order)."""
        return list(self.relu) + list(self.pool)

    @property
    def batch_size(self) -> int:
        first = next(iter(self.relu.values()), None)
        if first is None:
            first = next(iter(self.pool.values()), None)
        return 0 if first is None else int(first.shape[0])

    def is_binary(self, key: str) -> bool:
        """True where the site's gates are binary (bool ReLU gates, argmax max-pool gates)."""
        g = self.relu.get(key)
        return g.dtype == torch.bool if g is not None else not self.pool[key].is_floating_point()

    def select(self, rows: Tensor | slice) -> Gating:
        """The gates of the inputs ``rows`` (an index tensor or slice along N)."""
        return Gating(
            {k: v[rows] for k, v in self.relu.items()},
            {k: v[rows] for k, v in self.pool.items()},
            dict(self.pool_args),
            dict(self.pool_inputs),
            None if self.output is None else self.output[rows],
        )

    def packed(self) -> dict:
        """A compact, torch-saveable dict: binary ReLU gates as bits (:func:`pack_bits`), argmax positions as
        int16 where the input has at most 32768 positions (int32 else); soft gates as they are."""
        relu = {}
        for k, g in self.relu.items():
            relu[k] = {"bits": pack_bits(g), "shape": tuple(g.shape)} if g.dtype == torch.bool else g
        pool = {}
        for k, g in self.pool.items():
            if g.is_floating_point():
                pool[k] = g
            else:
                h, w = self.pool_inputs[k]
                pool[k] = g.to(torch.int16 if h * w <= 32768 else torch.int32)
        return {
            "format": "excitation_pullbacks.Gating/1",
            "relu": relu,
            "pool": pool,
            "pool_args": {k: vars(a).copy() for k, a in self.pool_args.items()},
            "pool_inputs": dict(self.pool_inputs),
            "output": self.output,
        }

    @classmethod
    def unpacked(cls, data: dict) -> Gating:
        """The inverse of :meth:`packed`."""
        if data.get("format") != "excitation_pullbacks.Gating/1":
            raise ValueError("not a packed Gating (Gating.packed)")
        relu = {k: unpack_bits(v["bits"], v["shape"]) if isinstance(v, dict) else v for k, v in data["relu"].items()}
        pool = {k: v if v.is_floating_point() else v.long() for k, v in data["pool"].items()}
        args = {k: PoolArgs(**a) for k, a in data["pool_args"].items()}
        return cls(relu, pool, args, {k: tuple(v) for k, v in data["pool_inputs"].items()}, data.get("output"))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`packed` with ``torch.save``."""
        torch.save(self.packed(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Gating:
        """Read a file written by :meth:`save`."""
        return cls.unpacked(torch.load(path, map_location="cpu", weights_only=True))


def _maxpool(z: Tensor, pool: PoolArgs, return_indices: bool = False):
    k, s, p, d = _geometry(pool)
    return F.max_pool2d(z, k, s, p, d, ceil_mode=pool.ceil_mode, return_indices=return_indices)


class _Recorder:
    """The Substitute that records the model's own gates (binary, or soft through ``schedule``), keeping
    every call as it is."""

    def __init__(self, schedule: Schedule | None):
        self.schedule = schedule
        self.gating = Gating()

    def __call__(self, site: Site, z: Tensor, pool: PoolArgs | None) -> None:
        z = z.detach()
        g = self.gating
        gate = None if self.schedule is None else self.schedule.rule(site).resolve(site.activation)
        if pool is None:
            if site.kind == "relu":
                g.relu[site.key] = (z > 0) if gate is None or gate.is_hard else gate(z, site.channel_dim)
            return
        g.pool_args[site.key] = pool
        g.pool_inputs[site.key] = (int(z.shape[-2]), int(z.shape[-1]))
        if gate is None or gate.is_hard:
            g.pool[site.key] = _maxpool(z, pool, return_indices=True)[1]
        elif gate.is_none:  # T = inf: uniform weights over each window's real (unpadded) entries
            real = _windows(torch.ones_like(z), pool, 0.0)
            g.pool[site.key] = real / real.sum(2, keepdim=True)
        else:
            t = gate.temperature
            if isinstance(t, Tensor) and t.numel() > 1:
                raise ValueError(f"soft max-pool gates take one temperature, not per channel ({site.key})")
            g.pool[site.key] = torch.softmax(_windows(z, pool, float("-inf")) / float(t), dim=2)


def _record(model: nn.Module, x: Tensor, schedule: Schedule | None) -> Gating:
    recorder = _Recorder(schedule)
    with torch.no_grad(), Excitation(model, temperature=0.0, gate="hard", substitute=recorder):
        out = model(x)
    recorder.gating.output = out.detach()
    return recorder.gating


def record_gates(model: nn.Module, x: Tensor) -> Gating:
    """The binary gates G(x) of ``model`` on x (N, ...): 1[z > 0] at every ReLU call, the argmax position at
    every max-pool call, and the model's output in ``Gating.output``. One forward pass, no gradient."""
    return _record(model, x, None)


def soft_gates(model: nn.Module, x: Tensor, schedule: Schedule | float | None = None, **gate) -> Gating:
    """The soft gates Gamma(x) of ``model`` on x (N, ...): sigma(z / T) of the model's own pre-activations at
    every ReLU call and softmax(window / T) at every max-pool call, sigma and T per site from ``schedule``
    (:func:`~excitation_pullbacks.gates.as_schedule`; a hard gate records binary gates there)."""
    return _record(model, x, as_schedule(schedule, **gate))


class _Replay:
    """The Substitute that applies a recorded gating: relu(z) -> lambda * z, max -> sum_j w_j window_j."""

    def __init__(self, gating: Gating):
        self.gating = gating
        self.used: set[str] = set()

    def __call__(self, site: Site, z: Tensor, pool: PoolArgs | None) -> Tensor | None:
        if pool is None and site.kind != "relu":
            return None
        key = site.key
        gates = self.gating.relu if pool is None else self.gating.pool
        g = gates.get(key)
        if g is None:
            kind = "ReLU" if pool is None else "max-pool"
            raise KeyError(f"the gating has no gates for the {kind} call {key!r} (it knows {self.gating.keys})")
        if g.shape[0] != z.shape[0]:
            raise ValueError(f"the gating holds {g.shape[0]} inputs, the batch {z.shape[0]} ({key})")
        self.used.add(key)
        g = g.to(z.device)
        if pool is None:
            if g.dtype == torch.bool:
                return torch.where(g, z, z.new_zeros(()))
            return g.to(z.dtype) * z
        if not g.is_floating_point():
            return z.flatten(2).gather(2, g.flatten(2)).view(g.shape)
        return (_windows(z, pool, 0.0) * g.to(z.dtype)).sum(2)


def induced_forward(model: nn.Module, x: Tensor, gating: Gating) -> Tensor:
    """f_Lambda(x): the model's forward on x (N, ...) with every ReLU output replaced by gate * z and every
    max-pool output by the gating's window entry (binary) or weighted window sum (soft).

    The gates are constants: the gradient of the result w.r.t. x is the Lambda-pullback (eq. 6). Gradients
    flow as in any forward (wrap in ``torch.no_grad()`` when none are needed). Raises KeyError when the
    model makes a ReLU or max-pool call the gating has no gates for, ValueError when it leaves gates unused
    or the batch sizes differ.
    """
    replay = _Replay(gating)
    with Excitation(model, temperature=0.0, gate="hard", substitute=replay):
        out = model(x)
    unused = [k for k in gating.keys if k not in replay.used]
    if unused:
        raise ValueError(f"the model made no call for the gated sites {unused}: a gating of another model?")
    return out


def gating_induced(model: nn.Module, x: Tensor, source: nn.Module | None = None) -> Tensor:
    """f_pi(x): ``model``'s forward on x with the binary gates of ``source`` (e.g. an earlier checkpoint of
    the same architecture) on the same x; ``source`` None: the model's own gates, f_G(x) = f(x)."""
    return induced_forward(model, x, record_gates(model if source is None else source, x))
