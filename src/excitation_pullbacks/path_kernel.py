"""Path kernel K_Gamma(x, x') = <x, x'> * prod_l <gamma_l(x), gamma_l(x')> (paper eq. 23).

K_Gamma is the dot product of the path-space features phi_Gamma(x) = Gamma~(x) (x) x: it compares two
inputs through the excitation of every path. The gates of ReLU, SiLU and GELU calls enter the product
(max-pool is a spatial selection and is not a factor here). At SiLU/GELU sites the gate must be soft: their
hard gate is the native derivative, not a gating; ``gate="own", temperature=1`` gives every site the
network's own gate (1[z>0] at ReLU, sigmoid(z) at SiLU, Phi(z) at GELU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import check_images
from .gates import Gate
from .gating import Excitation
from .options import resolve_schedule
from .schedules import Schedule
from .sites import Site

__all__ = ["path_kernel"]


@torch.no_grad()
def path_kernel(
    model: nn.Module,
    images: Tensor,
    schedule: Schedule | float | None = None,
    *,
    bias: bool = False,
    normalize: bool = False,
    **gate,
) -> Tensor:
    """K_Gamma for every pair of a batch.

    images: (N, ...) the model's inputs. Returns (N, N) float64.
    schedule, **gate: the gating Gamma (:func:`~excitation_pullbacks.gates.as_schedule`; ``gate="hard"``
        gives a ReLU network's own gates G, ``gate="own", temperature=1`` those of a network with ReLU, SiLU
        and GELU calls).
    bias: use the augmented vectors [x; 1] and [gamma_l; 1] of a network with biases (paper Sec. 2.1).
    normalize: return K(x, x') / sqrt(K(x, x) K(x', x')), computed in log space so it stays finite for
        deep networks, where K itself overflows float64.
    """
    check_images(model, images)
    sched = resolve_schedule(schedule, gate)
    n = images.shape[0]
    extra = 1.0 if bias else 0.0
    log_k = torch.zeros(n, n, dtype=torch.float64, device=images.device)
    sign = torch.ones(n, n, dtype=torch.float64, device=images.device)

    def accumulate(v: Tensor) -> None:
        nonlocal log_k, sign
        v = v.reshape(n, -1).double()
        dots = v @ v.T + extra
        log_k = log_k + dots.abs().log()
        sign = sign * torch.sign(dots)

    def observe(site: Site, z: Tensor, g: Gate) -> None:
        if site.kind not in ("relu", "silu", "gelu"):
            return  # max-pool is a spatial selection, norms and attention no gating: no factor
        if site.kind != "relu" and g.is_hard:
            raise ValueError(
                f"path_kernel: the hard gate at {site.kind} site {site.key!r} is the activation's "
                "derivative, not a gating; use a soft gate (gate='own', temperature=1: its own gate)"
            )
        accumulate(g(z.detach(), site.channel_dim))

    accumulate(images)
    engine = Excitation(model, sched, observer=observe)
    with engine as report:
        model(images)
    if report.relu_calls + report.silu_calls + report.gelu_calls == 0:
        raise ValueError("the model made no ReLU, SiLU or GELU call: the path kernel has no gates")
    if normalize:
        d = log_k.diagonal()
        return sign * torch.exp(log_k - 0.5 * (d[:, None] + d[None, :]))
    return sign * torch.exp(log_k)
