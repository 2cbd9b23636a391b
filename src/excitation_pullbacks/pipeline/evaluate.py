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

import csv
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch import Tensor

from excitation_pullbacks import ascent, excitation
from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import METHODS, as_direction, explainer
from excitation_pullbacks.gates import ByDepth, Gate, make_schedule

from .errors import PipelineError

__all__ = ["EvalSetting", "EvaluateModule", "EvaluateFinalizer", "METRICS", "settings_from_config", "depth_schedule"]

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
class EvalSetting:
    """One table row: method name, temperature label ('' for baselines), explain options, ascent or not."""

    label: str
    method: str
    temperature: str
    options: dict = field(default_factory=dict)
    ascent: bool = False


def depth_schedule(model: nn.Module, example: Tensor, temperatures: Sequence[float], *, shape: str,
                   temperature: float, pool_temperature, pool_detach: bool):
    """ReLU calls split by depth into len(temperatures) equal groups (input side first), group g gated at
    temperatures[g]; other sites (max-pool, SiLU, GELU) as ``make_schedule(temperature=temperature, ...)``
    sets them. example: (1, C, H, W), run once to count the ReLU calls."""
    temps = [float(t) for t in temperatures]
    with excitation(model, temperature=0.0, gate="hard") as report, torch.no_grad():
        model(example)
    n = max(report.relu_calls, 1)
    base = make_schedule(temperature=float(temperature), gate=shape, pool_temperature=pool_temperature,
                         pool_detach=pool_detach)
    gates = [Gate(shape, t) for t in temps]
    return ByDepth(lambda d: gates[min(d * len(gates) // n, len(gates) - 1)], default=base)


def settings_from_config(cfg, model: nn.Module, example: Tensor, dataset=None,
                         staging: Path | None = None) -> tuple[list[EvalSetting], int]:
    """-> the rows of the table (baselines, then excitation at each temperature) and the index of the row the
    objective reads (excitation at the temperature closest to gate.temperature). example: (1, C, H, W);
    dataset and staging serve per-channel calibration (gate=calibrated)."""
    ev, g = cfg.evaluate, cfg.gate
    unknown = [m for m in ev.methods if m not in METHODS]
    if unknown:
        raise PipelineError(f"unknown method(s) {', '.join(map(str, unknown))}; choose from {', '.join(METHODS)}")
    common = dict(smoothgrad_samples=int(ev.smoothgrad_samples), smoothgrad_noise=float(ev.smoothgrad_noise),
                  ig_steps=int(ev.ig_steps), ig_baseline=float(ev.ig_baseline), batch_size=ev.get("explain_batch_size"))
    ascent_methods = set(ev.ascent_methods)
    settings = [EvalSetting(m, m, "", dict(common), m in ascent_methods) for m in ev.methods if m != "excitation"]
    main = None
    if "excitation" in ev.methods and "calibration_scale" in g:  # per-channel temperatures
        from .job import _settings

        (calibrated,), _ = _settings(cfg, model, dataset, staging)
        settings.append(EvalSetting("excitation calibrated", "excitation", "",
                                    dict(common, **calibrated.kwargs), "excitation" in ascent_methods))
        main = len(settings) - 1
    elif "excitation" in ev.methods:
        temps = [float(t) for t in cfg.temperatures]
        depth = g.get("depth_temperatures")
        for t in temps:
            opts = dict(common, temperature=t, gate=g.shape, pool_temperature=g.pool_temperature,
                        pool_detach=bool(g.pool_detach))
            label = f"excitation T={t:g}"
            if depth:
                opts["schedule"] = depth_schedule(model, example, list(depth), shape=g.shape, temperature=t,
                                                  pool_temperature=g.pool_temperature, pool_detach=bool(g.pool_detach))
                label = f"excitation T={t:g} depth {'/'.join(f'{float(d):g}' for d in depth)}"
            settings.append(EvalSetting(label, "excitation", f"{t:g}", opts, "excitation" in ascent_methods))
        first = len(settings) - len(temps)
        main = first + min(range(len(temps)), key=lambda i: abs(temps[i] - float(g.temperature)))
    if not settings:
        raise PipelineError("evaluate.methods is empty")
    return settings, (main if main is not None else 0)


class EvaluateModule(L.LightningModule):
    """Per-image metrics of every setting, for ``Trainer.predict``.

    model: images (N, C, H, W) -> logits. settings: the table rows. target: ``label`` or ``predicted`` (the
    class whose maps are scored). Ascent goes to a seeded random class other than the target, with the
    ``steps``/``step_size``/``eps`` budget. transfer: {name: model} scored on each counterfactual.
    randomization_layers: the layer names the randomization check walks (top first), on the images whose
    row is below ``randomization_images``.
    """

    def __init__(self, model: nn.Module, settings: Sequence[EvalSetting], *, target: str = "label",
                 perturbation: dict, structure: dict, steps: int, step_size: float, eps: float,
                 randomization_images: int, randomization_layers: Sequence[str], transfer: dict | None = None,
                 seed: int = 0):
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
        offsets = torch.stack([torch.randint(1, k, (1,), generator=torch.Generator().manual_seed(self.seed + int(i)))
                               for i in index.cpu()]).view(-1).to(t.device)
        return t, (t + offsets) % k, logits

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        t, t_asc, logits = self._targets(x, labels, index)
        n, j = x.shape[0], len(self.settings)
        out: dict[str, Tensor] = {"row": rows, "index": index, "label": labels, "target": t, "ascent_target": t_asc,
                                  "top1": logits.argmax(1), "images": x}
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
            maps = explain(self.model, x, t)
            maps_all.append(maps)
            dele = M.deletion(self.model, x, maps, t, **self.perturbation)
            ins = M.insertion(self.model, x, maps, t, **self.perturbation)
            cols["deletion_auc"][:, i] = dele.cpu().double()
            cols["insertion_auc"][:, i] = ins.cpu().double()
            cols["map_hf_energy"][:, i] = M.high_frequency_energy(maps, **self.structure).cpu().double()
            cols["map_tv"][:, i] = M.total_variation(maps).cpu().double()
            curve = torch.full((n, 2, len(self.layer_names)), math.nan, dtype=torch.float64)
            if rand_rows.any() and self.layer_names:
                log.info("rank %d: randomization check over %d layers", self.global_rank, len(self.layer_names))
                res = M.randomization_check(self.model, x[rand_rows], t[rand_rows], explain,
                                            layers=self.layer_names, seed=self.seed)
                curve[rand_rows, 0] = res.spearman.T.cpu().double()
                curve[rand_rows, 1] = res.ssim.T.cpu().double()
                for key, sim in (("spearman", res.spearman), ("ssim", res.ssim)):
                    cols[f"randomization_{key}_top"][rand_rows, i] = sim[0].cpu().double()
                    cols[f"randomization_{key}_mean"][rand_rows, i] = sim.mean(0).cpu().double()
            curves.append(curve)
            if s.ascent and self.steps > 0:
                direction = as_direction(self.model, explain)
                x_adv = ascent(self.model, x, t_asc, steps=self.steps, step_size=self.step_size, eps=self.eps,
                               direction=direction)
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


class EvaluateFinalizer:
    """Rank 0, after the merge: the table (CSV, JSON), curves, grids, loggers; then staging -> results."""

    def __init__(self, cfg: dict, out: Path, settings: Sequence[EvalSetting], main: int, class_names: Sequence[str],
                 layer_names: Sequence[str], run_name: str):
        self.cfg, self.out, self.main = cfg, out, main
        self.rows = [(s.label, s.method, s.temperature) for s in settings]
        self.class_names, self.layer_names, self.run_name = list(class_names), list(layer_names), run_name
        self.objective: float | None = None

    def table(self, merged: dict) -> list[dict]:
        """One dict per setting: model, method, temperature, n_images, and mean and standard error per metric."""
        metric_keys = [k for k in merged if _is_metric(k)]
        table = []
        for i, (label, method, temp) in enumerate(self.rows):
            row = {"model": self.cfg["model"]["name"], "setting": label, "method": method, "temperature": temp,
                   "n_images": int(merged["row"].numel())}
            for k in metric_keys:
                mean, sem = _mean_sem(merged[k][:, i])
                row[k], row[f"{k}_sem"] = mean, sem
            table.append(row)
        return table

    def __call__(self, merged: dict) -> None:
        from .job import STAGING, finish_staging, log_results

        staging = self.out / STAGING
        table = self.table(merged)
        objective_key = self.cfg["evaluate"]["objective"]
        if objective_key not in table[self.main]:
            raise PipelineError(f"evaluate.objective {objective_key!r} is not a table column; choose one of "
                                f"{', '.join(k for k in table[0] if _is_metric(k))}")
        value = table[self.main][objective_key]
        self.objective = float(value) if value != "" else math.nan
        _write_csv(staging / "metrics_table.csv", table)
        _write_csv(staging / "per_image.csv", self._per_image(merged))
        curves = merged["randomization_curves"] if self.layer_names else None
        data = {"objective": {"metric": objective_key, "setting": table[self.main]["setting"], "value": self.objective},
                "metrics": METRICS, "table": table,
                "randomization": None if curves is None else {
                    "layers": self.layer_names,
                    "spearman": {r[0]: _nanmean0(curves[:, i, 0]) for i, r in enumerate(self.rows)},
                    "ssim": {r[0]: _nanmean0(curves[:, i, 1]) for i, r in enumerate(self.rows)}}}
        (staging / "metrics.json").write_text(json.dumps(data, indent=1) + "\n")
        from . import figures as F

        figs = {"curves": (F.metric_curves(table, list(METRICS)), "Metrics by gate temperature (baselines dashed)")}
        if curves is not None:
            figs["randomization"] = (F.randomization_curves(data["randomization"]),
                                     "Cascading randomization: similarity to the original maps")
        short = {"guided_backprop": "guided BP", "integrated_gradients": "IG", "smoothgrad": "SmoothGrad"}
        titles = [short.get(r[0], r[0]).replace("excitation ", "exc. ") for r in self.rows]
        figs["methods"] = (F.methods_grid(merged["images"], merged["maps"], titles,
                                          [self.class_names[int(c)] for c in merged["target"]]),
                           "Maps of every method for the target class (each cell min-max scaled)")
        for key, (im, _) in figs.items():
            im.save(staging / f"{key}.png")
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.cfg)))
        summary = {f"{r['setting']}/{k}": r[k] for r in table for k in r if _is_metric(k)
                   and r[k] != ""}
        summary["objective"] = self.objective
        log_results(self.cfg, staging, self.out, figs, table=[list(table[0])] + [list(r.values()) for r in table],
                    summary=summary, run_name=self.run_name)
        finish_staging(self.out)

    def _per_image(self, merged: dict) -> list[dict]:
        rows = []
        keys = [k for k in merged if _is_metric(k)]
        for b in range(merged["row"].numel()):
            for i, (label, method, temp) in enumerate(self.rows):
                row = {"row": int(merged["row"][b]), "dataset_index": int(merged["index"][b]),
                       "label": int(merged["label"][b]), "target": int(merged["target"][b]),
                       "ascent_target": int(merged["ascent_target"][b]), "setting": label, "method": method,
                       "temperature": temp}
                for k in keys:
                    v = float(merged[k][b, i])
                    row[k] = "" if math.isnan(v) else v
                rows.append(row)
        return rows


def _nanmean0(v: Tensor) -> list[float]:
    """(N, L) with NaN rows -> mean over the finite rows, (L,) as a list."""
    keep = ~torch.isnan(v).any(1)
    return v[keep].mean(0).tolist() if keep.any() else []


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def transfer_models(entries, weights, seed: int) -> dict[str, nn.Module]:
    """evaluate.transfer_models -> {label: model}. An entry is a model name (built with the run's weights
    setting) or a mapping {name, weights, checkpoint, label} (e.g. a second digits_cnn from its own
    checkpoint); labels must differ."""
    from excitation_pullbacks import build_model

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


def run_evaluate(cfg) -> dict:
    """The ``evaluate`` task (``task: evaluate``). Returns {"results", "wandb", "skipped", "timing",
    "objective"}: objective is evaluate.objective's mean for the excitation row at gate.temperature."""
    from .job import (RESULTS, _is_launcher, _output_dir, _run_name, _wandb_dir, _write_timing, predict,
                      prepare_output)

    started = time.perf_counter()
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    ev = cfg.evaluate
    if ev.target not in ("label", "predicted"):
        raise PipelineError(f"evaluate.target must be label or predicted, got {ev.target!r}")
    out = _output_dir(cfg)
    final = out / RESULTS
    if final.is_dir() and cfg.skip_complete:
        print(f"skipping complete run: {final}")
        return {"results": final, "wandb": _wandb_dir(final), "skipped": True,
                "objective": _stored_objective(final)}
    launcher = _is_launcher()
    staging = prepare_output(out, launcher)
    try:
        from excitation_pullbacks import build_model

        from .classes import class_names, class_space, resolve_classes
        from .data import build_dataset
        from .runner import ResultWriter

        space = class_space(cfg)
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model.name, cfg.model.weights, checkpoint=cfg.model.checkpoint)
        dataset = build_dataset(cfg.data, resolve_classes(list(cfg.targets.rows), space), space)
        images, labels, index = evaluation_images(dataset, int(ev.num_images), int(cfg.seed))
        settings, main = settings_from_config(cfg, model, images[:1], dataset, staging)
        transfer = transfer_models(ev.transfer_models or [], cfg.model.weights, int(cfg.seed))
        layer_names = (M.randomization_layers(model, images[:1], layers=ev.randomization_layers)
                       if int(ev.randomization_images) > 0 else [])
        module = EvaluateModule(
            model, settings, target=str(ev.target),
            perturbation=dict(steps=int(ev.perturbation_steps), baseline=_baseline(ev.perturbation_baseline),
                              score=str(ev.score), batch_size=int(ev.perturbation_batch_size)),
            structure=dict(cutoff=float(ev.hf_cutoff)), steps=int(cfg.ascent.steps),
            step_size=float(cfg.ascent.step_size), eps=float(cfg.ascent.eps),
            randomization_images=int(ev.randomization_images), randomization_layers=layer_names,
            transfer=transfer, seed=int(cfg.seed))
        finalize = EvaluateFinalizer(resolved, out, settings, main, class_names(space), layer_names, _run_name(cfg))
        predict(cfg, module, ResultWriter(staging, finalize), images, labels, index, out)
    except BaseException:
        if launcher and staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not launcher:
        return {"results": None, "wandb": None, "skipped": False, "objective": None}
    if not final.is_dir():
        raise PipelineError(f"the run finished without writing {final}")
    timing = _write_timing(final, time.perf_counter() - started, module.model_seconds)
    return {"results": final, "wandb": _wandb_dir(final), "skipped": False, "timing": timing,
            "objective": _stored_objective(final)}


def _baseline(value) -> str | float:
    """evaluate.perturbation_baseline: blur, mean, or a constant (e.g. -1: black in [-1, 1] images)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if str(value) not in ("blur", "mean"):
        raise PipelineError(f"evaluate.perturbation_baseline must be blur, mean or a number, got {value!r}")
    return str(value)


def _stored_objective(final: Path) -> float | None:
    path = final / "metrics.json"
    return json.loads(path.read_text())["objective"]["value"] if path.is_file() else None
