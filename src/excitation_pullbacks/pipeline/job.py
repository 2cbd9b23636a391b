"""``run(cfg)``: one experiment from a composed config (the CLI's body; tests call it directly).

Layout of a finished run in the output directory::

    results/  figures (fig*.png, sweep_*.png, baselines.png), tensors.pt, metrics.csv, config.yaml,
              calibration.pt, csv/ (CSV logger), wandb/ (offline W&B run)

(``task: evaluate`` writes the metric table instead: see :mod:`.evaluate`.)

Everything is written to ``.results.partial`` first and renamed to ``results`` at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from excitation_pullbacks import build_model
from excitation_pullbacks.gates import PerChannel, make_schedule

from .classes import class_names, class_space, resolve_classes
from .errors import PipelineError

__all__ = ["run", "FIGURES", "RESULTS", "STAGING"]

FIGURES = ("fig1", "fig2", "fig3", "fig4", "sweep", "baselines")
RESULTS = "results"
STAGING = ".results.partial"


def _output_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("output_dir"):
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise PipelineError("output_dir would be shared by every multirun job: leave it null (use hydra.sweep.dir)")
        return Path(os.path.expanduser(str(cfg.output_dir))).absolute()
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).absolute()
    raise PipelineError("output_dir is not set: run through the CLI or set output_dir=<dir>")


def _is_launcher() -> bool:
    """True in the process that starts the run (not a DDP child started by Lightning or a launcher)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def _temperature_label(t: float) -> str:
    return f"{t:g}"


def _validate(cfg: DictConfig) -> None:
    unknown = [f for f in cfg.figures if f not in FIGURES]
    if unknown:
        raise PipelineError(f"unknown figure(s) {', '.join(map(str, unknown))}; choose from {', '.join(FIGURES)}")
    steps = int(cfg.ascent.steps)
    if steps < 0:
        raise PipelineError(f"ascent.steps must be >= 0, got {steps}")
    if ("fig3" in cfg.figures or "fig4" in cfg.figures) and steps == 0:
        raise PipelineError("figures fig3/fig4 need ascent steps > 0 (use ascent=paper)")
    if "fig1" in cfg.figures and not 0 < int(cfg.ascent.fig1_steps) <= steps:
        raise PipelineError(f"fig1 needs 0 < ascent.fig1_steps <= ascent.steps (got {cfg.ascent.fig1_steps}, {steps})")
    temps = list(cfg.temperatures)
    if not temps or not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in temps):
        raise PipelineError(f"temperatures must be a non-empty list of numbers >= 0, got {temps}")
    if "baselines" in cfg.figures:
        from excitation_pullbacks.baselines import BASELINES

        methods = list(cfg.baselines.methods)
        bad = [m for m in methods if m not in BASELINES]
        if not methods or bad:
            raise PipelineError(f"baselines.methods must name some of {', '.join(BASELINES)}; got {methods}")
    if int(cfg.batch_size) < 1:
        raise PipelineError(f"batch_size must be >= 1, got {cfg.batch_size}")


def _settings(cfg: DictConfig, model, dataset, staging: Path):
    """-> (settings, index of the setting the figures use)."""
    from .runner import Setting

    g = cfg.gate
    base = dict(gate=g.shape, pool_temperature=g.pool_temperature, pool_detach=bool(g.pool_detach))
    if "calibration_scale" in g:  # per-channel gates
        fallback = make_schedule(temperature=g.temperature, **base)
        if g.calibration:
            path = Path(os.path.expanduser(str(g.calibration)))
            if not path.is_file():
                raise PipelineError(f"calibration file {path} does not exist (gate.calibration=null calibrates now)")
            schedule = PerChannel.load(path, default=fallback)
        else:
            from torch.utils.data import DataLoader

            from excitation_pullbacks import calibrate

            loader = DataLoader(dataset, batch_size=int(cfg.batch_size), shuffle=True,
                                generator=torch.Generator().manual_seed(int(cfg.seed)))
            batches = (b[0] for _, b in zip(range(int(g.calibration_batches)), loader))
            schedule = calibrate(model, batches, scale=float(g.calibration_scale), shape=g.shape, default=fallback)
            if _is_launcher():
                schedule.save(staging / "calibration.pt")
        return [Setting("calibrated", {"schedule": schedule})], 0
    temps = [float(t) for t in cfg.temperatures]
    settings = [Setting(_temperature_label(t), dict(base, temperature=t)) for t in temps]
    main = min(range(len(temps)), key=lambda i: abs(temps[i] - float(g.temperature)))
    return settings, main


class Finalizer:
    """Rank 0, after the merge: figures, tensors, metrics, config, loggers; then staging -> results."""

    def __init__(self, cfg: dict, out: Path, rows: list[int], columns: list[int], labels: list[str], main: int,
                 keep_steps: list[int], run_name: str | None = None):
        self.cfg, self.out, self.rows, self.columns = cfg, out, rows, columns
        self.run_name = run_name or cfg["name"]
        self.labels, self.main, self.keep_steps = labels, main, keep_steps

    def __call__(self, merged: dict) -> None:
        from . import figures as F
        from .runner import write_metrics_csv

        staging, names = self.out / STAGING, class_names(class_space(self.cfg))
        col_names = [names[c] for c in self.columns]
        row_names = [names[c] for c in self.rows]
        steps = self.cfg["ascent"]["steps"]
        imgs = merged["images"]
        figs: dict[str, tuple] = {}
        if "fig1" in self.cfg["figures"]:
            k = self.cfg["ascent"]["fig1_steps"]
            im = F.fig1(imgs, merged["exc_ascent"][:, self.main, self.keep_steps.index(k)], col_names, steps=k)
            figs["fig1"] = (im, f"Fig 1: differences after {k} ascent steps along excitation pullbacks "
                                f"(T = {self.labels[self.main]})")
        if "fig2" in self.cfg["figures"]:
            im = F.fig2(imgs, merged["vanilla"], merged["excitation"][:, self.main], col_names,
                        temperature=self.labels[self.main])
            figs["fig2"] = (im, f"Fig 2: vanilla gradients (top) vs excitation pullbacks (bottom, T = "
                                f"{self.labels[self.main]})")
        if "fig3" in self.cfg["figures"]:
            im = F.fig_ascent(imgs, merged["exc_ascent"][:, self.main, -1], col_names, steps=steps,
                              method=f"excitation pullbacks (T = {self.labels[self.main]})")
            figs["fig3"] = (im, f"Fig 3: {steps}-step ascent along excitation pullbacks: images and differences")
        if "fig4" in self.cfg["figures"]:
            im = F.fig_ascent(imgs, merged["van_ascent"][:, -1], col_names, steps=steps, method="vanilla gradients")
            figs["fig4"] = (im, f"Fig 4: {steps}-step ascent along vanilla gradients: images and differences")
        if "baselines" in self.cfg["figures"]:
            methods = list(self.cfg["baselines"]["methods"])
            im = F.fig_baselines(imgs, merged["baselines"], merged["excitation"][:, self.main], methods, col_names,
                                 temperature=self.labels[self.main])
            figs["baselines"] = (im, "Captum baselines and excitation pullbacks for the same images and targets")
        if "sweep" in self.cfg["figures"]:
            for r, name in enumerate(row_names):
                key = f"sweep_{r}_{name.replace(' ', '_')}"
                im = F.fig_sweep(imgs[r], merged["excitation"][r], self.labels, col_names,
                                 title=f"Excitation pullbacks of a {name} image by gate temperature")
                figs[key] = (im, f"Temperature sweep, {name} image: rows are gate temperatures")
        for key, (im, _) in figs.items():
            im.save(staging / f"{key}.png")
        tensors = dict(merged, columns=torch.tensor(self.columns), column_names=col_names, temperatures=self.labels,
                       ascent_steps=self.keep_steps)
        torch.save(tensors, staging / "tensors.pt")
        table = write_metrics_csv(staging / "metrics.csv", merged, self.columns, self.labels, names)
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.cfg)))
        log_results(self.cfg, staging, self.out, figs, table, self._summary(table), self.run_name)
        finish_staging(self.out)

    @staticmethod
    def _summary(table: list) -> dict[str, float]:
        """Mean target logit before/after ascent and the fraction of targets reached, per method and T."""
        header, rows = table[0], table[1:]
        col = {h: i for i, h in enumerate(header)}
        out: dict[str, float] = {}
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(f"{r[col['method']]}_T{r[col['temperature']]}", []).append(r)
        for key, rs in groups.items():
            out[f"{key}/logit_before"] = sum(r[col["logit_before"]] for r in rs) / len(rs)
            if rs[0][col["logit_after"]] != "":
                out[f"{key}/logit_after"] = sum(r[col["logit_after"]] for r in rs) / len(rs)
                out[f"{key}/hit_rate"] = sum(r[col["hit_after"]] for r in rs) / len(rs)
        return out


def log_results(cfg: dict, staging: Path, out: Path, figs: dict, table: list, summary: dict, run_name: str) -> None:
    """CSV logger (hyperparameters, summary) and W&B (figures, table, summary) in ``staging``; the W&B run's
    final path goes to ``wandb_run.txt``. figs: {key: (PIL image, caption)}; table: header row, then rows."""
    log = cfg["logger"]
    if log["csv"]:
        from lightning.pytorch.loggers import CSVLogger

        csv_logger = CSVLogger(str(staging), name="csv", version="")
        csv_logger.log_hyperparams(cfg)
        csv_logger.log_metrics(summary)
        csv_logger.save()
    if not log["wandb"] or log["mode"] == "disabled":
        return
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    # silent: W&B would print the staging path; run() reports the final one
    logger = WandbLogger(project=log["project"], name=run_name, group=log.get("group") or cfg["name"],
                         save_dir=str(staging), offline=log["mode"] == "offline", config=cfg,
                         settings=wandb.Settings(silent=True))
    try:
        for key, (im, caption) in figs.items():
            logger.log_image(key=f"figures/{key}", images=[im], caption=[caption])
        logger.log_table(key="metrics", columns=table[0], data=[[None if v == "" else v for v in r] for r in table[1:]])
        logger.log_metrics(summary)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        logger.experiment.finish()
    (staging / "wandb_run.txt").write_text(str(out / RESULTS / run_dir.relative_to(staging)) + "\n")


def finish_staging(out: Path) -> None:
    """Rename the complete staging folder to ``results`` (replacing an older one)."""
    final = out / RESULTS
    if final.exists():
        shutil.rmtree(final)
    os.replace(out / STAGING, final)


def predict(cfg: DictConfig, module, writer, images, labels, index, out: Path) -> None:
    """``Trainer.predict`` of ``module`` over (image, label, dataset index, row) batches of ``cfg.batch_size``
    on ``cfg.trainer``'s devices; ``writer`` (a ResultWriter) gathers the ranks' results.
    images (N, C, H, W), labels (N,), index (N,): row r is the r-th image."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy, inference_mode=False, logger=False, callbacks=[writer],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
    )
    loader = DataLoader(TensorDataset(images, labels, index, torch.arange(len(images))),
                        batch_size=int(cfg.batch_size), shuffle=False)
    trainer.predict(module, dataloaders=loader, return_predictions=False)


def prepare_output(out: Path, launcher: bool) -> Path:
    """Create ``out`` and an empty staging folder in it (the launcher clears an old one) -> the staging path."""
    staging = out / STAGING
    try:
        out.mkdir(parents=True, exist_ok=True)
        if launcher and staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(exist_ok=True)
        (staging / ".write-test").write_text("")
        (staging / ".write-test").unlink()
    except OSError as err:
        raise PipelineError(f"output directory {out} is not writable: {err.strerror or err}") from None
    return staging


def run(cfg: DictConfig) -> dict:
    """Run one experiment. Returns {"results": dir (None in DDP children), "wandb": offline run dir or None,
    "skipped": bool}, and for ``task: evaluate`` also "objective" (the value the Optuna sweeper optimises).

    Raises PipelineError (or ValueError/OSError from the core and torchvision) for bad input; nothing is
    left under ``results`` unless the run completed.
    """
    if cfg.get("task", "figures") == "evaluate":
        from .evaluate import run_evaluate

        return run_evaluate(cfg)
    if cfg.get("task", "figures") != "figures":
        raise PipelineError(f"unknown task {cfg.task!r}; choose figures or evaluate")
    from .data import build_dataset, select_images

    started = time.perf_counter()
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    _validate(cfg)
    space = class_space(cfg)  # the classes the model's logits stand for: names and lookup of the targets
    rows = resolve_classes(list(cfg.targets.rows), space)
    columns = rows + resolve_classes(list(cfg.targets.extra), space)
    if not rows:
        raise PipelineError("targets.rows is empty: name at least one class")
    if len(set(rows)) != len(rows):
        raise PipelineError("targets.rows names a class twice")
    out = _output_dir(cfg)
    final, staging = out / RESULTS, out / STAGING
    if final.is_dir() and cfg.skip_complete:
        print(f"skipping complete run: {final}")
        return {"results": final, "wandb": _wandb_dir(final), "skipped": True}
    launcher = _is_launcher()
    prepare_output(out, launcher)
    try:
        torch.manual_seed(int(cfg.seed))  # random weights (weights=null) are the same on every rank and run
        model = build_model(cfg.model.name, cfg.model.weights, checkpoint=cfg.model.checkpoint)
        dataset = build_dataset(cfg.data, rows, space)
        images, labels, index = select_images(dataset, rows, batch_size=int(cfg.selection_batch_size),
                                              seed=int(cfg.seed), space=space)
        settings, main = _settings(cfg, model, dataset, staging)
        from .runner import PullbackModule, ResultWriter

        steps = int(cfg.ascent.steps)
        keep = None if cfg.save_trajectories else [s for s in sorted({int(cfg.ascent.fig1_steps), steps}) if 0 < s <= steps]
        baselines = None
        if "baselines" in cfg.figures:
            b = cfg.baselines
            options = dict(smoothgrad_samples=int(b.smoothgrad_samples), smoothgrad_noise=float(b.smoothgrad_noise),
                           ig_steps=int(b.ig_steps), ig_baseline=float(b.ig_baseline))
            baselines = {str(m): options for m in b.methods}
        module = PullbackModule(model, columns, settings, steps=steps, step_size=float(cfg.ascent.step_size),
                                eps=float(cfg.ascent.eps), keep_steps=keep, baselines=baselines)
        finalize = Finalizer(resolved, out, rows, columns, [s.label for s in settings], main, module.keep_steps,
                             run_name=_run_name(cfg))
        predict(cfg, module, ResultWriter(staging, finalize), images, labels, index, out)
    except BaseException:
        if launcher and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not launcher:  # a DDP child: rank 0 (the launcher) reports
        return {"results": None, "wandb": None, "skipped": False}
    if not final.is_dir():
        raise PipelineError(f"the run finished without writing {final}")
    timing = _write_timing(final, time.perf_counter() - started, module.model_seconds)
    return {"results": final, "wandb": _wandb_dir(final), "skipped": False, "timing": timing}


def _write_timing(final: Path, total: float, model: float) -> dict:
    """timing.json: wall time of the run split into model passes (predict steps in this process: pullbacks,
    ascent) and everything else (model and data loading, selection, figures, writing, logging)."""
    timing = {"total_s": round(total, 3), "model_passes_s": round(model, 3) if model else None,
              "other_s": round(total - model, 3) if model else None,
              "other_fraction": round((total - model) / total, 4) if model else None}
    tmp = final / ".timing.json.tmp"
    tmp.write_text(json.dumps(timing, indent=1) + "\n")
    os.replace(tmp, final / "timing.json")
    return timing


def _run_name(cfg: DictConfig) -> str:
    """The run's name for loggers: ``name``, and in a multirun the job's overrides (``name/k=v,...``)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = HydraConfig.get().job.override_dirname
        if overrides:
            return f"{cfg.name}/{overrides}"
    return str(cfg.name)


def _wandb_dir(final: Path) -> Path | None:
    marker = final / "wandb_run.txt"
    return Path(marker.read_text().strip()) if marker.is_file() else None


def report(result: dict, stream=sys.stdout) -> None:
    """Print where the results are and how to sync the offline W&B run."""
    print(f"results: {result['results']}", file=stream)
    timing = result.get("timing") or {}
    if timing.get("model_passes_s") is not None:
        print(f"time: {timing['total_s']:.1f} s, model passes {timing['model_passes_s']:.1f} s, everything else "
              f"{timing['other_s']:.1f} s ({100 * timing['other_fraction']:.1f}%)", file=stream)
    if result.get("objective") is not None:
        print(f"objective: {result['objective']:.6g}", file=stream)
    if result.get("wandb"):
        print(f"W&B run: {result['wandb']} (upload with: wandb sync {result['wandb']})", file=stream)
