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

from .gating_induced import Gating, pool_one_hot

__all__ = ["Overlap", "gate_overlap", "gate_pearson", "path_tensor_pearson", "pearson", "pearson_moments"]


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
            agree = (x == y).sum(1)
            both, either = (x & y).sum(1), (x | y).sum(1)
        else:  # one chosen position per window: both = agree, either = 2 * windows - agree
            x, y = a.pool[key].flatten(1), b.pool[key].flatten(1)
            agree = (x == y).sum(1)
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


def _site_values(g: Gating, key: str) -> Tensor:
    """A site's gates as floats (N, D): ReLU gates as they are, max-pool gates as window weights."""
    if key in g.relu:
        return g.relu[key].flatten(1).double()
    v = g.pool[key]
    if not v.is_floating_point():
        v = pool_one_hot(v, g.pool_args[key], g.pool_inputs[key])
    return v.flatten(1).double()


def gate_pearson(a: Gating, b: Gating) -> dict[str, Tensor]:
    """Per site key: :func:`pearson_moments` (N, 6) of the gate values of a and b (soft or binary; max-pool
    gates as window weights, argmax positions as one-hot weights). ``pearson(m)`` gives r over all inputs."""
    return {key: pearson_moments(_site_values(a, key), _site_values(b, key)) for key in a.keys}


def path_tensor_pearson(a: Gating, b: Gating) -> Tensor:
    """Per input, Pearson's r between the path tensors a~(x) = (x)_l a_l(x) and b~(x) over the ReLU sites of a
    (the prod_l d_l paths; max-pool sites are not in the paper's path tensor) -> (N,) float64.

    Exact from per-layer means: with m_l = mean(a_l b_l) / (mean a_l mean b_l), p_l = mean(a_l^2) / mean(a_l)^2,
    q_l likewise for b, r = (prod m_l - 1) / sqrt((prod p_l - 1)(prod q_l - 1)), products taken in log space.
    NaN where a layer's gates are all 0 (the tensor is 0) or a tensor is constant.
    """
    log_m, log_p, log_q = 0.0, 0.0, 0.0
    for key in a.relu:
        x, y = a.relu[key].flatten(1).double(), b.relu[key].flatten(1).double()
        ma, mb = x.mean(1), y.mean(1)
        log_m = log_m + torch.log((x * y).mean(1)) - torch.log(ma) - torch.log(mb)
        log_p = log_p + torch.log((x * x).mean(1)) - 2 * torch.log(ma)
        log_q = log_q + torch.log((y * y).mean(1)) - 2 * torch.log(mb)
    num = torch.expm1(torch.as_tensor(log_m, dtype=torch.float64))
    den = (torch.expm1(torch.as_tensor(log_p, dtype=torch.float64)) * torch.expm1(torch.as_tensor(log_q))).sqrt()
    return num / den
