"""``run(cfg)``: the one run skeleton every task goes through (the CLI's body; tests call it directly).

validate -> skip a complete run -> staging folder -> the task's plan (model, data, per-batch module) ->
``Trainer.predict`` on ``cfg.trainer``'s devices -> rank 0: merge the ranks' shards, the task's files,
figures, config.yaml, loggers -> rename staging to ``results`` -> timing.json -> the report. Nothing is
left under ``results`` unless the run completed; a failed run removes its staging folder.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from .errors import PipelineError
from .fitting import fit
from .loggers import log_results
from .outputs import (
    RESULTS,
    STAGING,
    discard_staging,
    is_launcher,
    output_dir,
    prepare_staging,
    publish_staging,
    run_name,
    wandb_dir,
    write_timing,
)
from .tasks import TASKS
from .tasks.base import Plan, RunContext, Task
from .writer import ResultWriter

__all__ = ["report", "resolve", "run"]


def resolve(cfg: DictConfig) -> dict:
    """The composed config as a plain dict with interpolations resolved and enums as their names."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)


@dataclass
class Finish:
    """Rank 0, after the merge: the task's files, then figures, config.yaml and loggers, then staging ->
    results. Picklable (ddp_spawn)."""

    task: Task
    resolved: dict
    out: Path
    name: str

    def __call__(self, merged: dict) -> None:
        staging = self.out / STAGING
        outputs = self.task.finalize(merged, staging)
        for key, (im, _) in outputs.figures.items():
            im.save(staging / f"{key}.png")
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.resolved)))
        log_results(self.resolved, staging, self.out, outputs.figures, outputs.table, outputs.summary, self.name)
        publish_staging(self.out)


def predict(cfg: DictConfig, plan: Plan, writer: ResultWriter, out: Path) -> None:
    """``Trainer.predict`` of ``plan.module`` over (image, label, dataset index, row) batches of
    ``cfg.batch_size`` on ``cfg.trainer``'s devices; ``writer`` gathers the ranks' results."""
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy,
        inference_mode=False,
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    rows = torch.arange(len(plan.images))
    loader = DataLoader(
        TensorDataset(plan.images, plan.labels, plan.index, rows), batch_size=int(cfg.batch_size), shuffle=False
    )
    trainer.predict(plan.module, dataloaders=loader, return_predictions=False)


def task_for(cfg: DictConfig) -> Task:
    """A fresh instance of the task ``cfg.task`` names."""
    name = cfg.get("task", "figures")
    if name not in TASKS:
        raise PipelineError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


def run(cfg: DictConfig) -> dict:
    """Run one job. Returns {"results": dir (None in DDP children), "wandb": offline run dir or None,
    "skipped": bool, "timing": dict} and the task's own entries (evaluate: "objective").

    Raises PipelineError (or ValueError/OSError from the core and torchvision) for bad input.
    """
    started = time.perf_counter()
    task = task_for(cfg)
    resolved = resolve(cfg)
    if int(cfg.batch_size) < 1:
        raise PipelineError(f"batch_size must be >= 1, got {cfg.batch_size}")
    task.validate(cfg)
    out = output_dir(cfg)
    final = out / RESULTS
    if final.is_dir() and cfg.skip_complete:
        print(f"skipping complete run: {final}")
        return {"results": final, "wandb": wandb_dir(final), "skipped": True, **task.result(final)}
    launcher = is_launcher()
    staging = prepare_staging(out, launcher)
    try:
        torch.manual_seed(int(cfg.seed))  # random weights (weights=null) are the same on every rank and run
        plan = task.plan(RunContext(cfg, resolved, out, staging, launcher))
        finish = Finish(task, resolved, out, run_name(cfg))
        if plan.fit is None:
            predict(cfg, plan, ResultWriter(staging, finish), out)
        else:  # a training task
            fit(cfg, resolved, plan, finish, staging, run_name(cfg))
    except BaseException:
        if launcher:
            discard_staging(out)
        raise
    if not launcher:  # a DDP child: rank 0 (the launcher) reports
        return {"results": None, "wandb": None, "skipped": False}
    if not final.is_dir():
        raise PipelineError(f"the run finished without writing {final}")
    timing = write_timing(final, time.perf_counter() - started, plan.module.model_seconds)
    return {"results": final, "wandb": wandb_dir(final), "skipped": False, "timing": timing, **task.result(final)}


def report(result: dict, stream=sys.stdout) -> None:
    """Print where the results are, the time split, the objective, and how to sync the offline W&B run."""
    print(f"results: {result['results']}", file=stream)
    timing = result.get("timing") or {}
    if timing.get("model_passes_s") is not None:
        print(
            f"time: {timing['total_s']:.1f} s, model passes {timing['model_passes_s']:.1f} s, everything else "
            f"{timing['other_s']:.1f} s ({100 * timing['other_fraction']:.1f}%)",
            file=stream,
        )
    if result.get("objective") is not None:
        print(f"objective: {result['objective']:.6g}", file=stream)
    if result.get("wandb"):
        print(f"W&B run: {result['wandb']} (upload with: wandb sync {result['wandb']})", file=stream)
