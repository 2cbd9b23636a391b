"""The path_stability task's per-batch module: every checkpoint run with every checkpoint's gates, gate
overlaps and soft-vs-binary gate correlations."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from excitation_pullbacks.gate_overlap import gate_overlap, gate_pearson, path_rho
from excitation_pullbacks.gating_induced import induced_forward, record_gates, soft_gates

from ..schedules import GateSetting

__all__ = ["PathStabilityModule"]

log = logging.getLogger(__name__)


class PathStabilityModule(L.LightningModule):
    """Per batch of inputs: logits of every checkpoint with every checkpoint's (and the control run's) gates,
    gate overlaps and soft-vs-binary gate correlations.

    models: the run's checkpoints (K, in step order, eval mode); controls: another run's (Kc); settings: the
    gate settings Gamma_T of the final model (nT).
    """

    def __init__(self, models: Sequence[nn.Module], controls: Sequence[nn.Module], settings: Sequence[GateSetting]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.controls = nn.ModuleList(controls)
        self.settings = list(settings)

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """batch: (x (B, ...), labels (B,), index (B,), rows (B,)) -> CPU tensors: own (B, K, K, C) logits of
        checkpoint t (dim 2) with the gates of checkpoint t_pi (dim 1); control (B, Kc, K, C) with the control
        run's gates; agree/both/either (B, K, K, S) gate overlap counts between checkpoints (sizes (S,) in
        site_size); cross_agree (B, min(K, Kc), S) own vs control at the same index; path_rho (B, nT, K) and
        control_path_rho (B, nT, Kc) rho(Gamma~_T(x), pi(x)); site_moments (B, nT, K, S, 6) Pearson moments of
        soft vs binary gates per site; soft_logits (B, nT, C) f_Gamma_T."""
        with torch.no_grad():
            return self._predict(batch)

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        k, kc = len(self.models), len(self.controls)
        log.info("rank %d: %d inputs x %d checkpoints x %d gatings", self.global_rank, len(x), k, k + kc)
        gates = [record_gates(m, x) for m in self.models]
        control = [record_gates(m, x) for m in self.controls]
        own = torch.stack([torch.stack([induced_forward(m, x, g) for m in self.models], 1) for g in gates], 1)
        out = {"label": labels, "index": index, "row": rows, "own": own}
        if control:
            out["control"] = torch.stack(
                [torch.stack([induced_forward(m, x, g) for m in self.models], 1) for g in control], 1
            )
        keys = gates[0].keys
        counts = {name: torch.zeros(len(x), k, k, len(keys), dtype=torch.long) for name in ("agree", "both", "either")}
        for i in range(k):
            for j in range(i, k):  # symmetric
                for s, o in enumerate(gate_overlap(gates[i], gates[j]).values()):
                    for name, c in counts.items():
                        c[:, i, j, s] = c[:, j, i, s] = getattr(o, name)
        out.update(counts)
        out["site_size"] = torch.tensor([o.size for o in gate_overlap(gates[0], gates[0]).values()]).expand(len(x), -1)
        if control:
            out["cross_agree"] = torch.stack(
                [
                    torch.stack([o.agree for o in gate_overlap(a, b).values()], 1)
                    for a, b in zip(gates, control, strict=False)
                ],
                1,
            )
        final = self.models[-1]
        path, cpath, moments, soft_logits = [], [], [], []
        for setting in self.settings:
            soft = soft_gates(final, x, setting.schedule)
            relu = soft.select(slice(None))
            relu.pool = {}
            per_site = [gate_pearson(soft, g) for g in gates]
            path.append(torch.stack([path_rho({k: m[k] for k in soft.relu}) for m in per_site], 1))
            if control:
                cpath.append(torch.stack([path_rho(gate_pearson(relu, g)) for g in control], 1))
            moments.append(torch.stack([torch.stack(list(m.values()), 1) for m in per_site], 1))
            soft_logits.append(induced_forward(final, x, soft))
        out["path_rho"] = torch.stack(path, 1)
        if control:
            out["control_path_rho"] = torch.stack(cpath, 1)
        out["site_moments"] = torch.stack(moments, 1)
        out["soft_logits"] = torch.stack(soft_logits, 1)
        return {key: v.cpu() for key, v in out.items()}
