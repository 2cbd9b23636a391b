"""``fit``: the run skeleton's training branch, for tasks whose plan holds a :class:`~.tasks.base.Fit`.

``Trainer.fit`` of the plan's module on ``cfg.trainer``'s devices with the run's step loggers (CSV, W&B),
then rank 0 finishes the run as after a predict: the task's files, figures, config.yaml, loggers, publish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from .loggers import fit_loggers
from .tasks.base import Plan

__all__ = ["fit"]


def fit(cfg: DictConfig, resolved: dict, plan: Plan, finish: Callable[[dict], None], staging: Path, name: str) -> None:
    """Train ``plan.module`` as ``plan.fit`` says; ``finish({})`` on rank 0 afterwards."""
    spec = plan.fit
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy,
        logger=fit_loggers(resolved, staging, name) or False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,  # tasks save their own checkpoints (state dicts at chosen steps)
        default_root_dir=str(staging),
        **spec.trainer,
    )
    trainer.fit(plan.module, train_dataloaders=spec.train, val_dataloaders=spec.val)
    if trainer.is_global_zero:
        finish({})
