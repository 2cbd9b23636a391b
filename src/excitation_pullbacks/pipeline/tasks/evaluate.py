"""The ``evaluate`` task: a metric table for attribution methods x gate temperatures on one model.

Per image (Lightning ``Trainer.predict``, one shard per rank as for the figures): each method's maps, their
deletion/insertion AUC and structure proxies, ascent counterfactuals along the method (fixed L2 budget) with
their logit gain per unit norm, flip rate, structure and transfer to other models, and the cascading
parameter-randomization check on the first images. Rank 0 writes::

    results/  metrics_table.csv, metrics.json (table, randomization curves, objective), per_image.csv,
              curves.png (metric vs temperature), randomization.png, methods.png (maps grid), config.yaml,
              csv/, wandb/

``run(cfg)`` returns the table's ``objective`` value (the Optuna sweeper maximises or minimises it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from excitation_pullbacks import ascent, build_model
from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import METHODS, as_direction, explainer

from .. import plots
from ..classes import class_names, class_space, resolve_classes
from ..data import build_dataset
from ..errors import PipelineError
from ..outputs import write_csv
from ..schedules import GateSetting, check_main_temperature, check_temperatures, main_setting, run_gate_settings
from ..signals import check_stop, stop_requested
from .base import Outputs, Plan, RunContext, Task
from .figures import baseline_options

__all__ = [
    "METRICS",
    "EvaluateModule",
    "EvaluateTask",
    "MethodSetting",
    "evaluation_images",
    "method_settings",
    "transfer_models",
]

log = logging.getLogger(__name__)

#: Table columns: (name, what a higher value means).
METRICS = {
    "deletion_auc": "lower is better: the target score falls fast as top-attributed pixels are removed",
    "insertion_auc": "higher is better: the target score rises fast as top-attributed pixels are revealed",
    "map_hf_energy": "fraction of the map's spectral energy above the cutoff; lower: smoother, image-like",
    "map_tv": "normalised total variation of the map; lower: smoother",
    "randomization_spearman_top": "rank correlation with the map after randomising the top layer; lower passes",
    "randomization_spearman_mean": "rank correlation with the map, mean over the cascade's steps; lower passes",
    "randomization_ssim_top": "SSIM with the map after randomising the top layer; lower passes the check",
    "randomization_ssim_mean": "SSIM with the map, mean over the cascade's steps; lower passes the check",
    "ascent_gain": "target logit gain of the counterfactual (ascent toward another class, fixed L2 budget)",
    "ascent_gain_per_l2": "target logit gain of the counterfactual per unit L2 norm of its perturbation",
    "ascent_flip_rate": "fraction of counterfactuals whose top-1 class became the ascent target",
    "ascent_hf_energy": "high-frequency energy fraction of the counterfactual's perturbation; lower: smoother",
    "ascent_tv": "normalised total variation of the perturbation; lower: smoother",
}


@dataclass
class MethodSetting:
    """One table row: its label, the attribution method, the gate setting (excitation rows; None for
    baselines), the explainer's options, and whether counterfactuals are made along it."""

    label: str
    method: str
    gate: GateSetting | None
    options: dict
    ascent: bool = False

    @property
    def temperature(self) -> str:
        """The table's temperature column: the gate setting's T, '' for baselines and per-channel gates."""
        return "" if self.gate is None or self.gate.temperature is None else self.gate.label


def method_settings(
    ev, baselines: dict, gates: Sequence[GateSetting], depth: Sequence[float] | None = None
) -> list[MethodSetting]:
    """The table's rows: the baselines of ``ev.methods`` (Captum options ``baselines``), then excitation
    pullbacks at each gate setting. depth: the by-depth temperatures, named in the row labels."""
    unknown = [m for m in ev.methods if m not in METHODS]
    if unknown:
        raise PipelineError(f"unknown method(s) {', '.join(map(str, unknown))}; choose from {', '.join(METHODS)}")
    asc = set(ev.ascent_methods)
    rows = [MethodSetting(m, m, None, dict(baselines), m in asc) for m in ev.methods if m != "excitation"]
    if "excitation" in ev.methods:
        for g in gates:
            label = "excitation calibrated" if g.temperature is None else f"excitation T={g.label}"
            if depth:
                label += f" depth {'/'.join(f'{float(d):g}' for d in depth)}"
            rows.append(
                MethodSetting(label, "excitation", g, dict(baselines, schedule=g.schedule), "excitation" in asc)
            )
    if not rows:
        raise PipelineError("evaluate.methods is empty")
    return rows


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
        self.model_seconds = 0.0

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        start = time.perf_counter()
        try:
            with torch.enable_grad():  # Lightning predicts under no_grad / inference_mode
                return self._predict(batch)
        finally:
            if batch[0].is_cuda:
                torch.cuda.synchronize()
            self.model_seconds += time.perf_counter() - start

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


def _is_metric(key: str) -> bool:
    """A per-image metric column (METRICS, or transfer_gain/<model>, transfer_flip/<model>)."""
    return key in METRICS or key.startswith("transfer_")


def _mean_sem(v: Tensor) -> tuple[float | str, float | str]:
    """Mean and standard error over the finite entries of v (N,); ("", "") when there are none."""
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return "", ""
    sem = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), sem


def _nanmean0(v: Tensor) -> list[float]:
    """(N, L) with NaN rows -> mean over the finite rows, (L,) as a list."""
    keep = ~torch.isnan(v).any(1)
    return v[keep].mean(0).tolist() if keep.any() else []


def transfer_models(entries, weights, seed: int) -> dict[str, nn.Module]:
    """evaluate.transfer_models -> {label: model}. An entry is a model name (built with the run's weights
    setting) or a mapping {name, weights, checkpoint, label} (e.g. a second digits_cnn from its own
    checkpoint); labels must differ."""
    models: dict[str, nn.Module] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, w, ckpt, label = entry, weights, None, entry
        else:
            entry = dict(entry)
            if "name" not in entry:
                raise PipelineError(f"evaluate.transfer_models entry {entry} needs a name")
            name, w, ckpt = str(entry["name"]), entry.get("weights", weights), entry.get("checkpoint")
            label = str(entry.get("label") or (f"{name}:{Path(str(ckpt)).stem}" if ckpt else name))
        if label in models:
            raise PipelineError(f"evaluate.transfer_models names {label!r} twice; give each entry a label")
        torch.manual_seed(seed)  # random weights (weights=null) are reproducible
        models[label] = build_model(name, w, checkpoint=ckpt)
    return models


def evaluation_images(dataset, num_images: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``num_images`` of a seeded shuffle of the dataset -> images (N, C, H, W), labels (N,), indices (N,)."""
    if len(dataset) == 0:
        raise PipelineError("the dataset is empty")
    if num_images < 1:
        raise PipelineError(f"evaluate.num_images must be >= 1, got {num_images}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    items = [dataset[int(i)] for i in order]
    return torch.stack([im for im, _ in items]), torch.tensor([int(y) for _, y in items]), order


def _baseline(value) -> str | float:
    """evaluate.perturbation_baseline: blur, mean, or a constant (e.g. -1: black in [-1, 1] images)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if str(value) not in ("blur", "mean"):
        raise PipelineError(f"evaluate.perturbation_baseline must be blur, mean or a number, got {value!r}")
    return str(value)


def summary_table(model: str, rows: Sequence[MethodSetting], merged: dict) -> list[dict]:
    """One dict per table row: model, setting, method, temperature, n_images, and the mean and standard error
    of every per-image metric column of ``merged`` (N, J)."""
    metric_keys = [k for k in merged if _is_metric(k)]
    table = []
    for i, s in enumerate(rows):
        row = {
            "model": model,
            "setting": s.label,
            "method": s.method,
            "temperature": s.temperature,
            "n_images": int(merged["row"].numel()),
        }
        for k in metric_keys:
            mean, sem = _mean_sem(merged[k][:, i])
            row[k], row[f"{k}_sem"] = mean, sem
        table.append(row)
    return table


def per_image_table(rows: Sequence[MethodSetting], merged: dict) -> list[dict]:
    """One dict per image x table row with every per-image metric ("" where it was not computed)."""
    out = []
    keys = [k for k in merged if _is_metric(k)]
    for b in range(merged["row"].numel()):
        for i, s in enumerate(rows):
            row = {
                "row": int(merged["row"][b]),
                "dataset_index": int(merged["index"][b]),
                "label": int(merged["label"][b]),
                "target": int(merged["target"][b]),
                "ascent_target": int(merged["ascent_target"][b]),
                "setting": s.label,
                "method": s.method,
                "temperature": s.temperature,
            }
            for k in keys:
                v = float(merged[k][b, i])
                row[k] = "" if math.isnan(v) else v
            out.append(row)
    return out


class EvaluateTask(Task):
    """``task: evaluate``: the metric table of attribution methods x gate settings on one model."""

    name = "evaluate"

    def validate(self, cfg) -> None:
        ev = cfg.evaluate
        if ev.target not in ("label", "predicted"):
            raise PipelineError(f"evaluate.target must be label or predicted, got {ev.target!r}")
        unknown = [m for m in ev.methods if m not in METHODS]
        if unknown:
            raise PipelineError(f"unknown method(s) {', '.join(map(str, unknown))}; choose from {', '.join(METHODS)}")
        if not ev.methods:
            raise PipelineError("evaluate.methods is empty")
        temps = check_temperatures(cfg.temperatures)
        if "excitation" in ev.methods:  # the objective reads the excitation row at gate.temperature
            check_main_temperature(cfg.gate, temps)
        _baseline(ev.perturbation_baseline)

    def plan(self, ctx: RunContext) -> Plan:
        cfg, ev = ctx.cfg, ctx.cfg.evaluate
        space = class_space(cfg)
        self.model_name, self.objective_key = str(cfg.model.name), str(ev.objective)
        self.class_names = class_names(space)
        model = build_model(
            cfg.model.name,
            cfg.model.weights,
            checkpoint=cfg.model.checkpoint,
            compile=bool(cfg.model.get("compile", False)),
        )
        dataset = build_dataset(cfg.data, resolve_classes(list(cfg.targets.rows), space), space)
        images, labels, index = evaluation_images(dataset, int(ev.num_images), int(cfg.seed))

        gates = run_gate_settings(
            cfg, model, dataset, images[:1], save_to=ctx.staging / "calibration.pt" if ctx.launcher else None
        )
        depth = list(cfg.gate.depth_temperatures) if cfg.gate.kind == "by_depth" else None
        self.rows = method_settings(ev, baseline_options(cfg.baselines), gates, depth)
        self.main = 0
        if "excitation" in ev.methods:
            self.main = len(self.rows) - len(gates) + main_setting(gates, cfg.gate)
        transfer = transfer_models(ev.transfer_models or [], cfg.model.weights, int(cfg.seed))
        self.layer_names = (
            M.randomization_layers(model, images[:1], layers=ev.randomization_layers)
            if int(ev.randomization_images) > 0
            else []
        )
        module = EvaluateModule(
            model,
            self.rows,
            target=str(ev.target),
            perturbation=dict(
                steps=int(ev.perturbation_steps),
                baseline=_baseline(ev.perturbation_baseline),
                score=str(ev.score),
                batch_size=int(ev.perturbation_batch_size),
            ),
            structure=dict(cutoff=float(ev.hf_cutoff)),
            steps=int(cfg.ascent.steps),
            step_size=float(cfg.ascent.step_size),
            eps=float(cfg.ascent.eps),
            randomization_images=int(ev.randomization_images),
            randomization_layers=self.layer_names,
            transfer=transfer,
            seed=int(cfg.seed),
        )
        return Plan(module, images, labels, index)

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        table = summary_table(self.model_name, self.rows, merged)
        key = self.objective_key
        if key not in table[self.main]:
            raise PipelineError(
                f"evaluate.objective {key!r} is not a table column; choose one of "
                f"{', '.join(k for k in table[0] if _is_metric(k))}"
            )
        value = table[self.main][key]
        objective = float(value) if value != "" else math.nan
        write_csv(staging / "metrics_table.csv", table)
        per_image = per_image_table(self.rows, merged)
        write_csv(staging / "per_image.csv", per_image)
        curves = merged["randomization_curves"] if self.layer_names else None
        data = {
            "objective": {"metric": key, "setting": table[self.main]["setting"], "value": objective},
            "metrics": METRICS,
            "table": table,
            "randomization": None
            if curves is None
            else {
                "layers": self.layer_names,
                "spearman": {r.label: _nanmean0(curves[:, i, 0]) for i, r in enumerate(self.rows)},
                "ssim": {r.label: _nanmean0(curves[:, i, 1]) for i, r in enumerate(self.rows)},
            },
        }
        (staging / "metrics.json").write_text(json.dumps(data, indent=1) + "\n")
        figs = {"curves": (plots.metric_curves(table, list(METRICS)), "Metrics by gate temperature (baselines dashed)")}
        if curves is not None:
            figs["randomization"] = (
                plots.randomization_curves(data["randomization"]),
                "Cascading randomization: similarity to the original maps",
            )
        short = {"guided_backprop": "guided BP", "integrated_gradients": "IG", "smoothgrad": "SmoothGrad"}
        titles = [short.get(r.label, r.label).replace("excitation ", "exc. ") for r in self.rows]
        figs["methods"] = (
            plots.methods_grid(
                merged["images"], merged["maps"], titles, [self.class_names[int(c)] for c in merged["target"]]
            ),
            "Maps of every method for the target class (each cell min-max scaled)",
        )
        main = self.rows[self.main]
        summary = {
            f"{r['method']}/{k}": r[k]
            for i, (s, r) in enumerate(zip(self.rows, table))
            if s.gate is None or i == self.main
            for k in r
            if _is_metric(k) and r[k] != ""
        }
        summary["objective"] = objective
        if main.gate is not None and main.gate.temperature is not None:
            summary["temperature"] = float(main.gate.temperature)
        by_t = [
            {"method": "excitation", "temperature": float(s.gate.temperature)}
            | {k: r[k] for k in r if _is_metric(k) and r[k] != ""}
            for s, r in zip(self.rows, table)
            if s.gate is not None and s.gate.temperature is not None
        ]
        header = list(per_image[0]) if per_image else []
        per_image_rows = [header] + [[r.get(k, "") for k in header] for r in per_image]
        return Outputs(
            figs, [list(table[0])] + [list(r.values()) for r in table], summary, by_t, {"per_image": per_image_rows}
        )

    def result(self, final: Path) -> dict:
        """{"objective": the stored objective value} (what the Optuna sweeper optimises)."""
        path = final / "metrics.json"
        return {"objective": json.loads(path.read_text())["objective"]["value"] if path.is_file() else None}
