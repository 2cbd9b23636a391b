"""The ``figures`` task: the paper's figures for one model and data set.

Per batch of selected images (one per target row class) and for every target column: the vanilla gradient,
the excitation pullback at each gate setting, optionally Captum baselines, and projected gradient ascent
along both. Rank 0 writes::

    results/  fig1.png ... fig4.png, sweep_<r>_<class>.png, baselines.png, variants.png, tensors.pt (pullbacks,
              ascent images, the variants' maps), metrics.csv (target logit and top-1 before/after ascent per
              image x target x setting),
              metrics_table.csv (per method x setting: logit gain, hit rate, map structure; TABLE_METRICS)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from excitation_pullbacks import Neuron, build_model
from excitation_pullbacks.baselines import BASELINES

from .. import plots
from ..baselines import baseline_options
from ..classes import class_names, class_space, resolve_classes
from ..data import build_dataset, select_images
from ..errors import PipelineError
from ..modules import PullbackModule
from ..neurons import fig_neurons
from ..outputs import save_tensors, write_csv
from ..schedules import check_main_temperature, check_temperatures, main_setting, run_gate_settings
from ..tables.figures import by_temperature, method_table, summary, write_metrics_csv
from ..variant_settings import variant_explainers, variant_names, variant_title
from .base import Outputs, Plan, RunContext, Task

__all__ = ["FIGURES", "FiguresTask"]

FIGURES = ("fig1", "fig2", "fig3", "fig4", "sweep", "baselines", "neurons", "variants")


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
        # the figures draw the setting at gate.temperature; a sweep-only run need not include it (then it has none)
        try:
            check_main_temperature(cfg.gate, temps)
            self.has_main = True
        except PipelineError:
            if any(f != "sweep" for f in cfg.figures):
                raise
            self.has_main = False
        if "baselines" in cfg.figures:
            methods = list(cfg.baselines.methods)
            bad = [m for m in methods if m not in BASELINES]
            if not methods or bad:
                raise PipelineError(f"baselines.methods must name some of {', '.join(BASELINES)}; got {methods}")
        if "variants" in cfg.figures:
            if not list(cfg.variants.methods):
                raise PipelineError(
                    "figures=[variants] needs variants.methods (any of soft_pullback, pullback_ascent, "
                    "smooth_pullback, fusion_pullback)"
                )
            variant_explainers(cfg.variants)  # the options' checks, before anything runs
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
        self.main = main_setting(settings, cfg.gate) if self.has_main else None
        steps = int(cfg.ascent.steps)
        keep = (
            None
            if cfg.save_trajectories
            else [s for s in sorted({int(cfg.ascent.fig1_steps), steps}) if 0 < s <= steps]
        )
        baselines = None
        if "baselines" in self.figures:
            baselines = {str(m): baseline_options(cfg.baselines) for m in cfg.baselines.methods}
        self.variants = variant_names(cfg.variants) if "variants" in self.figures else []
        self.variant_cfg = cfg.variants
        variants = variant_explainers(cfg.variants, settings[self.main or 0].schedule) if self.variants else None
        module = PullbackModule(
            model,
            self.columns,
            settings,
            steps=steps,
            step_size=float(cfg.ascent.step_size),
            eps=float(cfg.ascent.eps),
            keep_steps=keep,
            baselines=baselines,
            variants=variants,
            neurons=self._neurons(cfg),
            neuron_setting=self.main or 0,
            one_target_per_pass=bool(cfg.model.get("compile", False)),
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
        if "variants" in self.figures:
            titles = [variant_title(self.variant_cfg, v, t_main) for v in self.variants]
            im = plots.fig_variants(
                imgs, merged["variants"], merged["excitation"][:, main], titles, col_names, temperature=t_main
            )
            figs["variants"] = (im, f"Pullback variants ({', '.join(self.variants)}) and excitation pullbacks")
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
        if self.variants:
            tensors["variant_names"] = self.variants
        save_tensors(tensors, staging / "tensors.pt")
        table = write_metrics_csv(staging / "metrics.csv", merged, self.columns, self.labels, self.names)
        rows = method_table(merged, self.columns, self.settings, self.variants, self.main)
        write_csv(staging / "metrics_table.csv", rows)
        scalars = summary(rows, self.main)
        if self.main is not None and self.settings[self.main].temperature is not None:
            scalars["temperature"] = float(self.settings[self.main].temperature)
        return Outputs(figs, table, scalars, by_temperature(rows))
