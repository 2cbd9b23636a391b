"""The ``figures`` task: the paper's figures for one model and data set.

Per batch of selected images (one per target row class) and for every target column: the vanilla gradient,
the excitation pullback at each gate setting, optionally Captum baselines, and projected gradient ascent
along both. Rank 0 writes::

    results/  fig1.png ... fig4.png, sweep_<r>_<class>.png, baselines.png, tensors.pt (pullbacks and ascent
              images), metrics.csv (target logit and top-1 before/after ascent per image x target x setting),
              metrics_table.csv (per method x setting: logit gain, hit rate, map structure; TABLE_METRICS)
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from excitation_pullbacks import Neuron, ascent, build_model, pullback
from excitation_pullbacks.baselines import BASELINES, explainer
from excitation_pullbacks.metrics import high_frequency_energy, total_variation

from .. import plots
from ..classes import class_names, class_space, resolve_classes
from ..data import build_dataset, select_images
from ..errors import PipelineError
from ..neurons import fig_neurons, neuron_views
from ..outputs import save_tensors, write_csv
from ..schedules import (
    VANILLA,
    GateSetting,
    check_main_temperature,
    check_temperatures,
    main_setting,
    run_gate_settings,
)
from ..signals import check_stop, stop_requested
from .base import Outputs, Plan, RunContext, Task

__all__ = [
    "FIGURES",
    "TABLE_METRICS",
    "FiguresTask",
    "PullbackModule",
    "baseline_options",
    "by_temperature",
    "method_table",
    "write_metrics_csv",
]

log = logging.getLogger(__name__)

FIGURES = ("fig1", "fig2", "fig3", "fig4", "sweep", "baselines", "neurons")


def baseline_options(b) -> dict:
    """The ``baselines`` config node -> keyword options of :func:`excitation_pullbacks.baselines.explainer`."""
    return dict(
        smoothgrad_samples=int(b.smoothgrad_samples),
        smoothgrad_noise=float(b.smoothgrad_noise),
        ig_steps=int(b.ig_steps),
        ig_baseline=float(b.ig_baseline),
        batch_size=b.get("batch_size"),
    )


def _checked(explain, model, x: Tensor, t: Tensor) -> Tensor:
    """``explain(model, x, t)`` after a stop check (Captum's loops take no callback)."""
    check_stop()
    return explain(model, x, t)


class PullbackModule(L.LightningModule):
    """Pullbacks, baselines and ascent of a batch of images for ``Trainer.predict``.

    model: images (N, 3, H, W) in [-1, 1] -> logits. columns: target classes (K). settings: the gate settings
    (nT). steps/step_size/eps: the ascent (steps 0: none); keep_steps: the trajectory steps kept (S).
    baselines: {Captum method: explainer options} for the same grid.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        columns: Sequence[int],
        settings: Sequence[GateSetting],
        *,
        steps: int = 0,
        step_size: float = 20.0,
        eps: float = 100.0,
        keep_steps: Sequence[int] | None = None,
        baselines: dict | None = None,
        neurons: Sequence[Neuron] = (),
        neuron_setting: int = 0,
    ):
        super().__init__()
        self.neurons, self.neuron_setting = list(neurons), int(neuron_setting)
        self.baselines = dict(baselines or {})
        self.model = model
        self.columns = list(columns)
        self.settings = list(settings)
        self.steps, self.step_size, self.eps = int(steps), float(step_size), float(eps)
        self.keep_steps = list(range(self.steps + 1)) if keep_steps is None else sorted(set(keep_steps))
        self.model_seconds = 0.0  # wall time of predict steps in this process (model passes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _ascent(self, x: Tensor, t: Tensor, setting: GateSetting) -> tuple[Tensor, Tensor]:
        """-> kept trajectory steps (B, S, K, 3, H, W) and the final images' logits (B, K, classes)."""
        final, traj = ascent(
            self.model,
            x,
            t,
            steps=self.steps,
            step_size=self.step_size,
            eps=self.eps,
            schedule=setting.schedule,
            return_trajectory=True,
            should_stop=stop_requested,
        )
        with torch.no_grad():
            logits = self.model(final.flatten(0, 1)).view(*final.shape[:2], -1)
        return traj[self.keep_steps].transpose(0, 1), logits

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """batch: (images (B, 3, H, W), labels (B,), dataset indices (B,), rows (B,)) -> dict of CPU tensors:
        vanilla (B, K, 3, H, W), excitation (B, nT, K, 3, H, W), baselines (B, nB, K, 3, H, W) when asked,
        logit_before (B, K), top1_before (B,) and with ascent exc_ascent (B, nT, S, K, 3, H, W),
        van_ascent (B, S, K, 3, H, W), exc_logit_after / exc_top1_after (B, nT, K), van_logit_after /
        van_top1_after (B, K).
        """
        start = time.perf_counter()
        try:
            with torch.enable_grad():  # Lightning predicts under no_grad / inference_mode
                return self._predict(batch)
        finally:
            if batch[0].is_cuda:  # count the queued kernels in this step's time
                torch.cuda.synchronize()
            self.model_seconds += time.perf_counter() - start

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        t = torch.tensor(self.columns, device=x.device).expand(x.shape[0], -1)
        out: dict[str, Tensor] = {"images": x, "label": labels, "index": index, "row": rows}
        log.info(
            "rank %d: pullbacks of %d images x %d targets at %d gate settings",
            self.global_rank,
            x.shape[0],
            t.shape[1],
            len(self.settings),
        )
        out["vanilla"] = pullback(self.model, x, t, schedule=VANILLA.schedule, should_stop=stop_requested)
        out["excitation"] = torch.stack(
            [pullback(self.model, x, t, schedule=s.schedule, should_stop=stop_requested) for s in self.settings], 1
        )
        if self.baselines:
            maps = []
            for method, options in self.baselines.items():
                log.info("rank %d: %s maps (Captum)", self.global_rank, method)
                explain = explainer(method, **options)
                maps.append(torch.stack([_checked(explain, self.model, x, t[:, k]) for k in range(t.shape[1])], 1))
            out["baselines"] = torch.stack(maps, 1)  # (B, nB, K, 3, H, W)
        with torch.no_grad():
            logits = self.model(x)
        out["logit_before"] = logits.gather(1, t)
        out["top1_before"] = logits.argmax(1)
        if self.neurons:
            log.info("rank %d: pullbacks and ascent of %d hidden neurons", self.global_rank, len(self.neurons))
            budget = dict(steps=self.steps, step_size=self.step_size, eps=self.eps)
            out.update(neuron_views(self.model, x, self.neurons, self.settings[self.neuron_setting], **budget))
        if self.steps > 0:
            runs = []
            for s in self.settings:
                log.info(
                    "rank %d: %d ascent steps along excitation pullbacks (T = %s)",
                    self.global_rank,
                    self.steps,
                    s.label,
                )
                runs.append(self._ascent(x, t, s))
            out["exc_ascent"] = torch.stack([r[0] for r in runs], 1)
            after = torch.stack([r[1] for r in runs], 1)  # (B, nT, K, classes)
            out["exc_logit_after"] = after.gather(3, t[:, None, :, None].expand(-1, len(runs), -1, 1))[..., 0]
            out["exc_top1_after"] = after.argmax(3)
            log.info("rank %d: %d ascent steps along vanilla gradients", self.global_rank, self.steps)
            out["van_ascent"], van = self._ascent(x, t, VANILLA)
            out["van_logit_after"] = van.gather(2, t[..., None])[..., 0]
            out["van_top1_after"] = van.argmax(2)
        return {k: v.detach().cpu() for k, v in out.items()}


def write_metrics_csv(
    path: Path, merged: dict[str, Tensor], columns: Sequence[int], labels: Sequence[str], names: Sequence[str]
) -> list[list]:
    """metrics.csv: one row per image x target x method (excitation at each setting, vanilla). Returns the
    header and rows ("" where there was no ascent)."""
    header = [
        "row",
        "dataset_index",
        "label",
        "label_name",
        "target",
        "target_name",
        "method",
        "temperature",
        "logit_before",
        "top1_before",
        "top1_before_name",
        "logit_after",
        "top1_after",
        "top1_after_name",
        "hit_after",
    ]
    rows = []
    has_ascent = "exc_ascent" in merged
    for i in range(merged["images"].shape[0]):
        base = [int(merged["row"][i]), int(merged["index"][i]), int(merged["label"][i]), names[int(merged["label"][i])]]
        top_b = int(merged["top1_before"][i])
        for k, c in enumerate(columns):
            before = [float(merged["logit_before"][i, k]), top_b, names[top_b]]
            methods = [("excitation", lab, j) for j, lab in enumerate(labels)] + [("vanilla", VANILLA.label, None)]
            for method, temp, j in methods:
                if has_ascent:
                    if j is None:
                        la, ta = float(merged["van_logit_after"][i, k]), int(merged["van_top1_after"][i, k])
                    else:
                        la, ta = float(merged["exc_logit_after"][i, j, k]), int(merged["exc_top1_after"][i, j, k])
                    after = [la, ta, names[ta], int(ta == c)]
                else:
                    after = ["", "", "", ""]
                rows.append(base + [c, names[c], method, temp] + before + after)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue())
    return [header, *rows]


#: The per-(method, T) aggregates of the figures task: what metrics_table.csv and the dashboard hold.
TABLE_METRICS = {
    "logit_before": "mean target logit of the images",
    "logit_after": "mean target logit after the ascent along the method's maps",
    "logit_gain": "mean target-logit gain of the ascent (after - before)",
    "hit_rate": "fraction of ascents whose top-1 class became the target",
    "map_hf_energy": "mean fraction of the map's spectral energy above half the Nyquist radius; lower: smoother",
    "map_tv": "mean normalised total variation of the map; lower: smoother",
}


def method_table(merged: dict[str, Tensor], columns: Sequence[int], settings: Sequence[GateSetting]) -> list[dict]:
    """One row per method - excitation at each gate setting, then vanilla - with the means over images x
    targets of :data:`TABLE_METRICS` (the ascent's only where there was one). merged: the predictions
    (excitation (N, S, K, C, H, W), vanilla (N, K, C, H, W), logits and top-1 before/after)."""
    target = torch.tensor(list(columns))
    has_ascent = "exc_ascent" in merged
    methods = [("excitation", s.label, s.temperature, j) for j, s in enumerate(settings)]
    methods.append(("vanilla", VANILLA.label, None, None))
    rows = []
    for method, label, temperature, j in methods:
        maps = merged["vanilla"] if j is None else merged["excitation"][:, j]
        flat = maps.flatten(0, 1).double()  # (N*K, C, H, W)
        row = {
            "method": method,
            "setting": label,
            "temperature": "" if temperature is None else float(temperature),
            "n": int(flat.shape[0]),
            "logit_before": float(merged["logit_before"].double().mean()),
        }
        if has_ascent:
            after = merged["van_logit_after"] if j is None else merged["exc_logit_after"][:, j]
            top1 = merged["van_top1_after"] if j is None else merged["exc_top1_after"][:, j]
            row["logit_after"] = float(after.double().mean())
            row["logit_gain"] = float((after.double() - merged["logit_before"].double()).mean())
            row["hit_rate"] = float((top1 == target).double().mean())
        row["map_hf_energy"] = float(high_frequency_energy(flat).mean())
        row["map_tv"] = float(total_variation(flat).mean())
        rows.append(row)
    return rows


def _metric_keys(row: dict) -> list[str]:
    return [k for k in TABLE_METRICS if k in row]


def summary(rows: list[dict], main: int | None) -> dict[str, float]:
    """The run's scalars: ``excitation/<metric>`` at the main setting (the one at gate.temperature; none
    when the run has no main setting) and ``vanilla/<metric>``."""
    out: dict[str, float] = {}
    for i, r in enumerate(rows):
        if r["method"] == "vanilla" or i == main:
            out.update({f"{r['method']}/{k}": r[k] for k in _metric_keys(r)})
    return out


def by_temperature(rows: list[dict]) -> list[dict]:
    """The excitation rows with a numeric T as per-T records of the metrics that depend on T (vanilla is in
    the summary: it has no T; logit_before is the same at every T)."""
    return [
        {
            "method": "excitation",
            "temperature": r["temperature"],
            **{k: r[k] for k in _metric_keys(r) if k != "logit_before"},
        }
        for r in rows
        if r["method"] == "excitation" and r["temperature"] != ""
    ]


class FiguresTask(Task):
    """``task: figures``: the grids of Figs 1-4, temperature sweeps and Captum baselines for one model."""

    name = "figures"

    def validate(self, cfg) -> None:
        unknown = [f for f in cfg.figures if f not in FIGURES]
        if unknown:
            raise PipelineError(f"unknown figure(s) {', '.join(map(str, unknown))}; choose from {', '.join(FIGURES)}")
        steps = int(cfg.ascent.steps)
        if steps < 0:
            raise PipelineError(f"ascent.steps must be >= 0, got {steps}")
        if ("fig3" in cfg.figures or "fig4" in cfg.figures) and steps == 0:
            raise PipelineError("figures fig3/fig4 need ascent steps > 0 (use ascent=paper)")
        if "fig1" in cfg.figures and not 0 < int(cfg.ascent.fig1_steps) <= steps:
            raise PipelineError(
                f"fig1 needs 0 < ascent.fig1_steps <= ascent.steps (got {cfg.ascent.fig1_steps}, {steps})"
            )
        temps = check_temperatures(cfg.temperatures)
        if any(f != "sweep" for f in cfg.figures):  # the figures draw the setting at gate.temperature
            check_main_temperature(cfg.gate, temps)
        if "baselines" in cfg.figures:
            methods = list(cfg.baselines.methods)
            bad = [m for m in methods if m not in BASELINES]
            if not methods or bad:
                raise PipelineError(f"baselines.methods must name some of {', '.join(BASELINES)}; got {methods}")
        if "neurons" in cfg.figures and not (cfg.get("neurons") and list(cfg.neurons.channels)):
            raise PipelineError(
                "figures=[neurons] needs neurons.layer and neurons.channels (experiment=digits_neurons)"
            )
        space = class_space(cfg)
        rows = resolve_classes(list(cfg.targets.rows), space)
        if not rows:
            raise PipelineError("targets.rows is empty: name at least one class")
        if len(set(rows)) != len(rows):
            raise PipelineError("targets.rows names a class twice")

    def plan(self, ctx: RunContext) -> Plan:
        cfg = ctx.cfg
        space = class_space(cfg)  # the classes the model's logits stand for
        self.rows = resolve_classes(list(cfg.targets.rows), space)
        self.columns = self.rows + resolve_classes(list(cfg.targets.extra), space)
        self.names = class_names(space)
        self.figures, self.ascent = list(cfg.figures), dict(ctx.resolved["ascent"])
        model = build_model(
            cfg.model.name,
            cfg.model.weights,
            checkpoint=cfg.model.checkpoint,
            compile=bool(cfg.model.get("compile", False)),
        )
        dataset = build_dataset(cfg.data, self.rows, space)
        images, labels, index = select_images(
            dataset, self.rows, batch_size=int(cfg.selection_batch_size), seed=int(cfg.seed), space=space
        )

        settings = run_gate_settings(
            cfg, model, dataset, images[:1], save_to=ctx.staging / "calibration.pt" if ctx.launcher else None
        )
        self.labels = [s.label for s in settings]
        self.settings = settings
        needs_main = any(f != "sweep" for f in self.figures)
        try:
            self.main = main_setting(settings, cfg.gate)
        except PipelineError:  # a sweep-only run need not include gate.temperature: it has no main setting
            if needs_main:
                raise
            self.main = None
        steps = int(cfg.ascent.steps)
        keep = (
            None
            if cfg.save_trajectories
            else [s for s in sorted({int(cfg.ascent.fig1_steps), steps}) if 0 < s <= steps]
        )
        baselines = None
        if "baselines" in self.figures:
            baselines = {str(m): baseline_options(cfg.baselines) for m in cfg.baselines.methods}
        module = PullbackModule(
            model,
            self.columns,
            settings,
            steps=steps,
            step_size=float(cfg.ascent.step_size),
            eps=float(cfg.ascent.eps),
            keep_steps=keep,
            baselines=baselines,
            neurons=self._neurons(cfg),
            neuron_setting=self.main or 0,
        )
        self.keep_steps = module.keep_steps
        self.methods = list(baselines or [])
        return Plan(module, images, labels, index)

    def _neurons(self, cfg) -> list[Neuron]:
        """The hidden neurons of the ``neurons`` figure: channels of ``neurons.layer`` (optionally at one position)."""
        if "neurons" not in self.figures:
            return []
        n = cfg.neurons
        position = None if n.get("position") is None else tuple(int(p) for p in n.position)
        self.neuron_layer, self.neuron_channels = str(n.layer), [int(c) for c in n.channels]
        return [Neuron(self.neuron_layer, c, position) for c in self.neuron_channels]

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        col_names = [self.names[c] for c in self.columns]
        row_names = [self.names[c] for c in self.rows]
        steps, main = self.ascent["steps"], self.main
        t_main = None if main is None else self.labels[main]
        imgs = merged["images"]
        figs: dict[str, tuple] = {}
        if "fig1" in self.figures:
            k = self.ascent["fig1_steps"]
            im = plots.fig1(imgs, merged["exc_ascent"][:, main, self.keep_steps.index(k)], col_names, steps=k)
            figs["fig1"] = (im, f"Fig 1: differences after {k} ascent steps along excitation pullbacks (T = {t_main})")
        if "fig2" in self.figures:
            im = plots.fig2(imgs, merged["vanilla"], merged["excitation"][:, main], col_names, temperature=t_main)
            figs["fig2"] = (im, f"Fig 2: vanilla gradients (top) vs excitation pullbacks (bottom, T = {t_main})")
        if "fig3" in self.figures:
            im = plots.fig_ascent(
                imgs,
                merged["exc_ascent"][:, main, -1],
                col_names,
                steps=steps,
                method=f"excitation pullbacks (T = {t_main})",
            )
            figs["fig3"] = (im, f"Fig 3: {steps}-step ascent along excitation pullbacks: images and differences")
        if "fig4" in self.figures:
            im = plots.fig_ascent(imgs, merged["van_ascent"][:, -1], col_names, steps=steps, method="vanilla gradients")
            figs["fig4"] = (im, f"Fig 4: {steps}-step ascent along vanilla gradients: images and differences")
        if "baselines" in self.figures:
            im = plots.fig_baselines(
                imgs, merged["baselines"], merged["excitation"][:, main], self.methods, col_names, temperature=t_main
            )
            figs["baselines"] = (im, "Captum baselines and excitation pullbacks for the same images and targets")
        if "sweep" in self.figures:
            for r, name in enumerate(row_names):
                key = f"sweep_{r}_{name.replace(' ', '_')}"
                im = plots.fig_sweep(
                    imgs[r],
                    merged["excitation"][r],
                    self.labels,
                    col_names,
                    title=f"Excitation pullbacks of a {name} image by gate temperature",
                )
                figs[key] = (im, f"Temperature sweep, {name} image: rows are gate temperatures")
        if "neurons" in self.figures:
            im = fig_neurons(
                imgs,
                merged,
                [f"channel {c}" for c in self.neuron_channels],
                layer=self.neuron_layer,
                temperature=t_main,
            )
            figs["neurons"] = (
                im,
                f"Hidden neurons of {self.neuron_layer}: pullbacks and ascent, vanilla vs excitation",
            )
        tensors = dict(
            merged,
            columns=torch.tensor(self.columns),
            column_names=col_names,
            temperatures=self.labels,
            ascent_steps=self.keep_steps,
        )
        save_tensors(tensors, staging / "tensors.pt")
        table = write_metrics_csv(staging / "metrics.csv", merged, self.columns, self.labels, self.names)
        rows = method_table(merged, self.columns, self.settings)
        write_csv(staging / "metrics_table.csv", rows)
        scalars = summary(rows, self.main)
        if self.main is not None and self.settings[self.main].temperature is not None:
            scalars["temperature"] = float(self.settings[self.main].temperature)
        return Outputs(figs, table, scalars, by_temperature(rows))
