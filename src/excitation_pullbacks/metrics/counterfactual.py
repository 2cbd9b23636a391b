"""Scores of counterfactuals: logit gain and top-1 flips, on the model that made them or on others."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ascent import ascent
from ..checks import class_targets
from ..state import keeps_model

__all__ = ["AscentScores", "TransferResult", "ascent_scores", "transfer", "transfer_scores"]


@dataclass
class AscentScores:
    """Per-sample scores of counterfactuals x_adv of x toward ``target``, all (N,):

    gain: logit_target(x_adv) - logit_target(x); l2: ||x_adv - x||_2; gain_per_l2: gain / l2 (NaN where
    l2 = 0); flipped: 1.0 where the top-1 class of x was not the target and that of x_adv is, 0.0 where it
    was not and is not, NaN where x was already classified as the target (not counted);
    before, after: top-1 classes of x and x_adv. Higher gain, gain_per_l2 and flip rate: a stronger
    counterfactual."""

    gain: Tensor
    l2: Tensor
    gain_per_l2: Tensor
    flipped: Tensor
    before: Tensor
    after: Tensor

    @property
    def flip_rate(self) -> float:
        """Fraction of the eligible samples (x not already the target) whose top-1 became the target."""
        v = self.flipped[~torch.isnan(self.flipped)]
        return float(v.mean()) if v.numel() else math.nan


def _logits(model: nn.Module, x: Tensor, batch_size: int | None) -> Tensor:
    step = batch_size or x.shape[0]
    with torch.no_grad():
        return torch.cat([model(x[i : i + step]) for i in range(0, x.shape[0], step)])


def _flatten_grid(x: Tensor, x_adv: Tensor, target) -> tuple[Tensor, Tensor, Tensor]:
    if x_adv.dim() == x.dim() + 1:  # (N, K, C, H, W) from ascent on a target grid
        k = x_adv.shape[1]
        x = x[:, None].expand(-1, k, *x.shape[1:]).reshape(-1, *x.shape[1:])
        x_adv = x_adv.reshape(-1, *x_adv.shape[2:])
        target = torch.as_tensor(target, device=x.device).reshape(-1)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv {tuple(x_adv.shape)} does not match x {tuple(x.shape)}")
    return x, x_adv, class_targets(target, x.shape[0], x.device, grid=False)


@keeps_model
def ascent_scores(model: nn.Module, x: Tensor, x_adv: Tensor, target, *, batch_size: int | None = None) -> AscentScores:
    """Scores of counterfactuals: x (N, C, H, W), x_adv (N, C, H, W) made toward target (N,) -> AscentScores
    with (N,) tensors. x_adv (N, K, C, H, W) with target (N, K) (an ascent grid) gives (N * K,) rows in
    row-major order. batch_size: images per forward (None: all). See :class:`AscentScores`."""
    x, x_adv, t = _flatten_grid(x.detach(), x_adv.detach(), target)
    before, after = _logits(model, x, batch_size), _logits(model, x_adv, batch_size)
    gain = (after.gather(1, t[:, None]) - before.gather(1, t[:, None]))[:, 0]
    l2 = (x_adv - x).flatten(1).norm(dim=1).to(gain.dtype)
    per = torch.where(l2 > 0, gain / l2.clamp_min(torch.finfo(l2.dtype).tiny), torch.full_like(gain, math.nan))
    top0, top1 = before.argmax(1), after.argmax(1)
    flipped = (top1 == t).to(gain.dtype)
    flipped = torch.where(top0 == t, torch.full_like(flipped, math.nan), flipped)
    return AscentScores(gain=gain, l2=l2, gain_per_l2=per, flipped=flipped, before=top0, after=top1)


def transfer_scores(
    models: Mapping[str, nn.Module], x: Tensor, x_adv: Tensor, target, *, batch_size: int | None = None
) -> dict[str, AscentScores]:
    """:func:`ascent_scores` of precomputed counterfactuals x_adv (N, C, H, W) on each model: name -> scores
    with (N,) tensors (gain: target logit gain on that model; flipped: its top-1 became the target)."""
    return {name: ascent_scores(m, x, x_adv, target, batch_size=batch_size) for name, m in models.items()}


@dataclass
class TransferResult:
    """x_adv (N, C, H, W): the counterfactuals made on the source model; scores: model name -> AscentScores."""

    x_adv: Tensor
    scores: dict[str, AscentScores]


def transfer(
    source_model: nn.Module,
    target_models: Mapping[str, nn.Module],
    x: Tensor,
    target,
    *,
    steps: int = 10,
    step_size: float = 20.0,
    eps: float = 100.0,
    vanilla: bool = False,
    direction: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int | None = None,
    **ascent_options,
) -> TransferResult:
    """Counterfactuals made on ``source_model`` and scored on each of ``target_models``.

    x: (N, C, H, W) in [-1, 1]; target: (N,). The counterfactuals are
    ``excitation_pullbacks.ascent(source_model, x, target, steps=..., step_size=..., eps=..., vanilla=...,
    direction=..., **ascent_options)`` (L2 budget ``eps``); each target model scores them with
    :func:`ascent_scores` (include the source in ``target_models`` to score it too). Higher gain / flip rate
    on another model: the counterfactual transfers.
    """
    t = class_targets(target, x.shape[0], x.device, grid=False)
    x_adv = ascent(
        source_model,
        x,
        t,
        steps=steps,
        step_size=step_size,
        eps=eps,
        vanilla=vanilla,
        direction=direction,
        **ascent_options,
    )
    return TransferResult(x_adv=x_adv, scores=transfer_scores(target_models, x, x_adv, t, batch_size=batch_size))
