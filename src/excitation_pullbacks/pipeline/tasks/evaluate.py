"""The ``evaluate`` task: a metric table for attribution methods x gate temperatures on one model.

Per image (Lightning ``Trainer.predict``, each batch saved as a shard as it is made, :mod:`..shards`): each method's maps, their
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
import math
from pathlib import Path

from torch import Tensor

from excitation_pullbacks import build_model
from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import METHODS

from .. import plots
from ..atomic import write_text
from ..baselines import baseline_options
from ..classes import class_names, class_space, resolve_classes
from ..data import EvaluationRows, build_dataset
from ..errors import PipelineError
from ..evaluate_metrics import METRICS, is_metric
from ..method_settings import method_settings
from ..modules import EvaluateModule
from ..outputs import write_csv
from ..schedules import check_main_temperature, check_temperatures, main_setting, run_gate_settings
from ..tables.evaluate import per_image_table, randomization_means, summary_table
from ..transfer_models import transfer_models
from .base import Outputs, Plan, RunContext, Task

__all__ = ["METHODS_GRID_ROWS", "EvaluateTask"]

#: Images (the first rows) the methods figure shows.
METHODS_GRID_ROWS = 8


def _baseline(value) -> str | float:
    """evaluate.perturbation_baseline: blur, mean, or a constant (e.g. -1: black in [-1, 1] images)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if str(value) not in ("blur", "mean"):
        raise PipelineError(f"evaluate.perturbation_baseline must be blur, mean or a number, got {value!r}")
    return str(value)


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
        rows = EvaluationRows(dataset, int(ev.num_images), int(cfg.seed))  # read batch by batch
        images = rows[0][0][None]  # the first image: calibration and the randomization check's layers

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
        # the methods figure draws the first rows only: the other images and maps are not kept
        keep = {"images": METHODS_GRID_ROWS, "maps": METHODS_GRID_ROWS}
        return Plan(module, None, None, None, data=rows, keep_first=keep)

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        table = summary_table(self.model_name, self.rows, merged)
        key = self.objective_key
        if key not in table[self.main]:
            raise PipelineError(
                f"evaluate.objective {key!r} is not a table column; choose one of "
                f"{', '.join(k for k in table[0] if is_metric(k))}"
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
            "randomization": None if curves is None else randomization_means(curves, self.rows, self.layer_names),
        }
        write_text(staging / "metrics.json", json.dumps(data, indent=1) + "\n")
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
                merged["images"],
                merged["maps"],
                titles,
                [self.class_names[int(c)] for c in merged["target"]],
                max_rows=METHODS_GRID_ROWS,
            ),
            "Maps of every method for the target class (each cell min-max scaled)",
        )
        main = self.rows[self.main]
        summary = {
            f"{r['method']}/{k}": r[k]
            for i, (s, r) in enumerate(zip(self.rows, table))
            if s.gate is None or i == self.main
            for k in r
            if is_metric(k) and r[k] != ""
        }
        summary["objective"] = objective
        if main.gate is not None and main.gate.temperature is not None:
            summary["temperature"] = float(main.gate.temperature)
        by_t = [
            {"method": "excitation", "temperature": float(s.gate.temperature)}
            | {k: r[k] for k in r if is_metric(k) and r[k] != ""}
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
