"""Comparing two gatings of the same inputs (:class:`~excitation_pullbacks.gating_induced.Gating`), per site.

Binary vs binary (e.g. the gates of two checkpoints): the fraction of gates that agree and the IoU of the
active sets (at a max-pool site the active set is the chosen (window, position) pairs). Soft vs binary:
Pearson's correlation of the gate values. And the correlation of the rank-1 path tensors (paper eqs. 10-13)
lambda~(x) = lambda_1(x) (x) ... (x) lambda_L(x) over the ReLU sites, computed exactly from per-layer moments
without forming the prod_l d_l entries - the quantity rho(Gamma~(x), pi(x)) of Hypothesis 1.

Counts come per input (leading axis N) so that batches can be merged before reducing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gating_induced import Gating, pool_slots

__all__ = ["Overlap", "gate_overlap", "gate_pearson", "path_rho", "path_tensor_pearson", "pearson", "pearson_moments"]


@dataclass(frozen=True)
class Overlap:
    """Per-input counts at one site: agree (N,) gates equal in both gatings, both (N,) active in both,
    either (N,) active in at least one; size: gates per input."""

    agree: Tensor
    both: Tensor
    either: Tensor
    size: int

    @property
    def agreement(self) -> float:
        """Fraction of agreeing gates over all inputs."""
        return float(self.agree.sum()) / (self.size * len(self.agree))

    @property
    def iou(self) -> float:
        """|active in both| / |active in either| over all inputs (1 when neither has an active gate)."""
        either = float(self.either.sum())
        return float(self.both.sum()) / either if either else 1.0


def gate_overlap(a: Gating, b: Gating) -> dict[str, Overlap]:
    """Per site key (ReLU then max-pool sites of ``a``): how the binary gates of a and b on the same N inputs
    overlap. Raises ValueError for soft gates or mismatched sites."""
    out = {}
    for key in a.keys:
        if key not in b.relu and key not in b.pool:
            raise ValueError(f"site {key!r} is missing from the second gating")
        if not (a.is_binary(key) and b.is_binary(key)):
            raise ValueError(f"site {key!r}: gate overlap compares binary gates")
        if key in a.relu:
            x, y = a.relu[key].flatten(1), b.relu[key].flatten(1)
            both = (x & y).count_nonzero(1)
            either = x.count_nonzero(1) + y.count_nonzero(1) - both
            agree = x.shape[1] - either + both  # both on, or both off
        else:  # one chosen position per window: both = agree, either = 2 * windows - agree
            x, y = a.pool[key].flatten(1), b.pool[key].flatten(1)
            agree = (x == y).count_nonzero(1)
            both, either = agree, 2 * x.shape[1] - agree
        out[key] = Overlap(agree, both, either, int(x.shape[1]))
    return out


def pearson_moments(a: Tensor, b: Tensor) -> Tensor:
    """Per-row sufficient statistics of Pearson's r: a, b (N, D) -> (N, 6) float64 columns
    (count, sum a, sum b, sum ab, sum a^2, sum b^2); rows add up across batches."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    count = torch.full((a.shape[0],), a.shape[1], dtype=torch.float64, device=a.device)
    return torch.stack([count, a.sum(1), b.sum(1), (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)], 1)


def pearson(moments: Tensor) -> float:
    """Pearson's r from summed :func:`pearson_moments` (6,) or (N, 6) (summed over N); NaN when either
    variable is constant."""
    n, sa, sb, sab, saa, sbb = moments.reshape(-1, 6).sum(0).tolist()
    cov = n * sab - sa * sb
    var = (n * saa - sa * sa) * (n * sbb - sb * sb)
    return cov / var**0.5 if var > 0 else float("nan")


def _moments(g: Gating, key: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """A site's gates as values v (N, D) in ``dtype`` (argmax positions: their window slots), sum v, sum v^2."""
    if key in g.relu:
        v = g.relu[key].flatten(1).to(dtype)
        return v, v.sum(1, dtype=torch.float64), (v * v).sum(1, dtype=torch.float64)
    v = g.pool[key]
    if not v.is_floating_point():  # one-hot weights: one 1 per window
        windows = torch.full((v.shape[0],), v[0].numel(), dtype=torch.float64, device=v.device)
        return pool_slots(v, g.pool_args[key], g.pool_inputs[key]), windows, windows
    v = v.to(dtype)
    flat = v.flatten(1)
    return v, flat.sum(1, dtype=torch.float64), (flat * flat).sum(1, dtype=torch.float64)


def _cross(va: Tensor, vb: Tensor) -> Tensor:
    """sum_j a_j b_j per input (N,), float64, for values or window slots (int64, see :func:`_moments`)."""
    if not va.is_floating_point() and not vb.is_floating_point():
        return (va == vb).flatten(1).sum(1, dtype=torch.float64)
    if not va.is_floating_point():
        va, vb = vb, va
    if not vb.is_floating_point():  # soft weights at the argmax slot
        return va.gather(2, vb).flatten(1).sum(1, dtype=torch.float64)
    return (va.flatten(1) * vb.flatten(1)).sum(1, dtype=torch.float64)


def gate_pearson(a: Gating, b: Gating) -> dict[str, Tensor]:
    """Per site key: :func:`pearson_moments` (N, 6) of the gate values of a and b (soft or binary; max-pool
    gates as window weights, argmax positions as one-hot weights). ``pearson(m)`` gives r over all inputs.
    Elementwise work in the soft gates' dtype (float32 for float32 models), sums in float64."""
    out = {}
    for key in a.keys:
        soft = [g.relu.get(key, g.pool.get(key)) for g in (a, b)]
        dtype = next((v.dtype for v in soft if v.is_floating_point()), torch.float32)
        va, sa, saa = _moments(a, key, dtype)
        vb, sb, sbb = _moments(b, key, dtype)
        count = torch.full_like(sa, float(_size(a, key)))
        out[key] = torch.stack([count, sa, sb, _cross(va, vb), saa, sbb], 1)
    return out


def _size(g: Gating, key: str) -> int:
    """Gate values per input at a site: z's size at a ReLU, windows x window entries at a max-pool."""
    v = g.relu.get(key, g.pool.get(key))
    if v.is_floating_point() or key in g.relu:
        return v[0].numel()
    k = g.pool_args[key].kernel_size
    return v[0].numel() * (k * k if isinstance(k, int) else int(k[0]) * int(k[-1]))


def path_tensor_pearson(a: Gating, b: Gating) -> Tensor:
    """Per input, Pearson's r between the path tensors a~(x) = (x)_l a_l(x) and b~(x) over the ReLU sites of a
    (the prod_l d_l paths; max-pool sites are not in the paper's path tensor) -> (N,) float64.
    :func:`path_rho` of the ReLU sites' :func:`gate_pearson` moments."""
    relu = Gating(dict(a.relu))
    return path_rho(gate_pearson(relu, b))


def path_rho(moments: dict[str, Tensor]) -> Tensor:
    """Per input, Pearson's r between two rank-1 path tensors from the per-layer :func:`pearson_moments`
    {ReLU site key: (N, 6)} of their factors -> (N,) float64.

    Exact: with m_l = mean(a_l b_l) / (mean a_l mean b_l), p_l = mean(a_l^2) / mean(a_l)^2 and q_l likewise
    for b, r = (prod m_l - 1) / sqrt((prod p_l - 1)(prod q_l - 1)), the products taken in log space. NaN where
    a layer's gates are all 0 (the tensor is 0) or a tensor is constant.
    """
    log_m, log_p, log_q = 0.0, 0.0, 0.0
    for m in moments.values():
        n, sa, sb, sab, saa, sbb = m.unbind(1)
        log_m = log_m + torch.log(sab) + torch.log(n) - torch.log(sa) - torch.log(sb)
        log_p = log_p + torch.log(saa) + torch.log(n) - 2 * torch.log(sa)
        log_q = log_q + torch.log(sbb) + torch.log(n) - 2 * torch.log(sb)
    num = torch.expm1(torch.as_tensor(log_m, dtype=torch.float64))
    den = (torch.expm1(torch.as_tensor(log_p, dtype=torch.float64)) * torch.expm1(torch.as_tensor(log_q))).sqrt()
    return num / den
