"""The evaluate task's per-batch module: every method's maps and their per-image metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from excitation_pullbacks import ascent
from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import as_direction, explainer

from ..evaluate_metrics import METRICS
from ..method_settings import MethodSetting
from ..signals import check_stop, stop_requested
from ..zero_maps import warn_if_zero

__all__ = ["EvaluateModule"]

log = logging.getLogger(__name__)


class EvaluateModule(L.LightningModule):
    """Per-image metrics of every setting, for ``Trainer.predict``.

    model: images (N, C, H, W) -> logits. settings: the table rows. target: ``label`` or ``predicted`` (the
    class whose maps are scored). Ascent goes to a seeded random class other than the target, with the
    ``steps``/``step_size``/``eps`` budget. transfer: {name: model} scored on each counterfactual.
    randomization_layers: the layer names the randomization check walks (top first), on the images whose
    row is below ``randomization_images``.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: Sequence[MethodSetting],
        *,
        target: str = "label",
        perturbation: dict,
        structure: dict,
        steps: int,
        step_size: float,
        eps: float,
        randomization_images: int,
        randomization_layers: Sequence[str],
        transfer: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.model = model
        self.settings = list(settings)
        self.target, self.perturbation, self.structure = target, dict(perturbation), dict(structure)
        self.steps, self.step_size, self.eps = int(steps), float(step_size), float(eps)
        self.randomization_images, self.layer_names = int(randomization_images), list(randomization_layers)
        self.transfer = nn.ModuleDict(transfer or {})
        self.seed = int(seed)
        self._warned_zero = False

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        with torch.enable_grad():  # Lightning predicts under no_grad / inference_mode
            return self._predict(batch)

    def _targets(self, x: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            logits = self.model(x)
        t = logits.argmax(1) if self.target == "predicted" else labels
        # ascent target: a seeded random class other than t, fixed per dataset index
        k = logits.shape[1]
        offsets = (
            torch.stack(
                [
                    torch.randint(1, k, (1,), generator=torch.Generator().manual_seed(self.seed + int(i)))
                    for i in index.cpu()
                ]
            )
            .view(-1)
            .to(t.device)
        )
        return t, (t + offsets) % k, logits

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        t, t_asc, logits = self._targets(x, labels, index)
        n, j = x.shape[0], len(self.settings)
        out: dict[str, Tensor] = {
            "row": rows,
            "index": index,
            "label": labels,
            "target": t,
            "ascent_target": t_asc,
            "top1": logits.argmax(1),
            "images": x,
        }
        nan = torch.full((n, j), math.nan, dtype=torch.float64)
        cols = {name: nan.clone() for name in METRICS}
        for name in self.transfer:
            cols[f"transfer_gain/{name}"] = nan.clone()
            cols[f"transfer_flip/{name}"] = nan.clone()
        maps_all, curves = [], []
        rand_rows = rows < self.randomization_images
        for i, s in enumerate(self.settings):
            log.info("rank %d: %s on %d images", self.global_rank, s.label, n)
            explain = explainer(s.method, **s.options)
            check_stop()
            maps = explain(self.model, x, t)
            maps_all.append(maps)
            if s.method == "excitation" and not self._warned_zero:  # one line per run
                self._warned_zero = warn_if_zero(maps, self.model, log)
            dele = M.deletion(self.model, x, maps, t, should_stop=stop_requested, **self.perturbation)
            ins = M.insertion(self.model, x, maps, t, should_stop=stop_requested, **self.perturbation)
            cols["deletion_auc"][:, i] = dele.cpu().double()
            cols["insertion_auc"][:, i] = ins.cpu().double()
            cols["map_hf_energy"][:, i] = M.high_frequency_energy(maps, **self.structure).cpu().double()
            cols["map_tv"][:, i] = M.total_variation(maps).cpu().double()
            curve = torch.full((n, 2, len(self.layer_names)), math.nan, dtype=torch.float64)
            if rand_rows.any() and self.layer_names:
                log.info("rank %d: randomization check over %d layers", self.global_rank, len(self.layer_names))
                res = M.randomization_check(
                    self.model,
                    x[rand_rows],
                    t[rand_rows],
                    explain,
                    layers=self.layer_names,
                    seed=self.seed,
                    should_stop=stop_requested,
                )
                curve[rand_rows, 0] = res.spearman.T.cpu().double()
                curve[rand_rows, 1] = res.ssim.T.cpu().double()
                for key, sim in (("spearman", res.spearman), ("ssim", res.ssim)):
                    cols[f"randomization_{key}_top"][rand_rows, i] = sim[0].cpu().double()
                    cols[f"randomization_{key}_mean"][rand_rows, i] = sim.mean(0).cpu().double()
            curves.append(curve)
            if s.ascent and self.steps > 0:
                direction = as_direction(self.model, explain)
                x_adv = ascent(
                    self.model,
                    x,
                    t_asc,
                    steps=self.steps,
                    step_size=self.step_size,
                    eps=self.eps,
                    direction=direction,
                    should_stop=stop_requested,
                )
                scores = M.ascent_scores(self.model, x, x_adv, t_asc)
                cols["ascent_gain"][:, i] = scores.gain.cpu().double()
                cols["ascent_gain_per_l2"][:, i] = scores.gain_per_l2.cpu().double()
                cols["ascent_flip_rate"][:, i] = scores.flipped.cpu().double()
                delta = x_adv - x
                cols["ascent_hf_energy"][:, i] = M.high_frequency_energy(delta, **self.structure).cpu().double()
                cols["ascent_tv"][:, i] = M.total_variation(delta).cpu().double()
                for name, other in self.transfer.items():
                    sc = M.ascent_scores(other, x, x_adv, t_asc)
                    cols[f"transfer_gain/{name}"][:, i] = sc.gain.cpu().double()
                    cols[f"transfer_flip/{name}"][:, i] = sc.flipped.cpu().double()
        out.update(cols)
        out["maps"] = torch.stack(maps_all, 1)  # (B, J, C, H, W)
        out["randomization_curves"] = torch.stack(curves, 1)  # (B, J, 2, L), NaN for unchecked images
        return {k: v.detach().cpu() for k, v in out.items()}
