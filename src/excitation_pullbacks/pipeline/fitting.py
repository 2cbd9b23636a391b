"""``fit``: the run skeleton's training branch, for tasks whose plan holds a :class:`~.tasks.base.Fit`.

``Trainer.fit`` of the plan's module on ``cfg.trainer``'s devices with the run's step loggers (CSV, W&B),
then rank 0 finishes the run as after a predict: the task's files, figures, config.yaml, loggers, publish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from .dashboard import Dashboard
from .loggers import fit_loggers
from .tasks.base import Plan
from .terminal import describe_device, progress_callbacks
from .timing import StepTimer

__all__ = ["fit"]


def fit(
    cfg: DictConfig,
    plan: Plan,
    finish: Callable[[dict], None],
    staging: Path,
    dashboard: Dashboard | None,
    timer: StepTimer,
) -> str:
    """Train ``plan.module`` as ``plan.fit`` says, logging steps to CSV and the job's W&B run (``dashboard``),
    ``timer`` adding up the training steps' time; ``finish({})`` on rank 0 afterwards. Returns the device it
    ran on."""
    spec = plan.fit
    progress, bar = progress_callbacks()
    extra = dict(spec.trainer)
    callbacks = [timer, *extra.pop("callbacks", []), *progress]
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy,
        logger=fit_loggers(bool(cfg.logger.csv), staging, dashboard) or False,
        callbacks=callbacks,
        enable_progress_bar=bar,
        enable_model_summary=False,
        enable_checkpointing=False,  # tasks save their own checkpoints (state dicts at chosen steps)
        default_root_dir=str(staging),
        **extra,
    )
    trainer.fit(plan.module, train_dataloaders=spec.train, val_dataloaders=spec.val)
    if trainer.is_global_zero:
        finish({})
    return describe_device(trainer)
