"""``fit``: the run skeleton's training branch, for tasks whose plan holds a :class:`~.tasks.base.Fit`.

``Trainer.fit`` of the plan's module on ``cfg.trainer``'s devices with the run's step loggers (CSV, W&B),
then rank 0 finishes the run as after a predict: the task's files, figures, config.yaml, loggers, publish.
A training run whose batches come from :class:`~.batches.GlobalBatches` is resumable (:mod:`.resume`): on a
resume signal it saves its state in the staging folder and stops; given a saved state, ``Trainer.fit`` goes
on from it (``ckpt_path``) and the step log (``csv_train/metrics.csv``) is continued.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from .batches import GlobalBatches
from .dashboard import Dashboard
from .loggers import CSV_TRAIN, continued_csv, fit_loggers
from .outputs import is_launcher
from .resume import ResumeCallback, ResumeState, discard_state
from .tasks.base import Plan
from .terminal import describe_device, progress_callbacks
from .timing import StepTimer

__all__ = ["Resume", "fit"]


@dataclass(frozen=True)
class Resume:
    """How a training run is resumable: its config hash, the signals that save its state, and the state it
    goes on from (None: it starts at step 0)."""

    config_hash: str
    signals: tuple[int, ...]
    state: ResumeState | None = None


def fit(
    cfg: DictConfig,
    plan: Plan,
    finish: Callable[[dict], None],
    staging: Path,
    dashboard: Dashboard | None,
    timer: StepTimer,
    resume: Resume,
) -> str:
    """Train ``plan.module`` as ``plan.fit`` says, logging steps to CSV and the job's W&B run (``dashboard``),
    ``timer`` adding up the training steps' time, resumable as ``resume`` says; ``finish({})`` on rank 0
    afterwards. Returns the device it ran on."""
    spec = plan.fit
    progress, bar = progress_callbacks()
    extra = dict(spec.trainer)
    callbacks = [timer, *extra.pop("callbacks", [])]
    sampler = getattr(spec.train, "batch_sampler", None)
    if not isinstance(sampler, GlobalBatches):  # no seeded batch order to resume in: stops only
        sampler, resume = None, Resume(resume.config_hash, ())
    callbacks.append(ResumeCallback(staging, resume.config_hash, resume.signals, sampler))
    state = resume.state
    csv = bool(cfg.logger.csv)
    with continued_csv(staging / CSV_TRAIN, enabled=csv and state is not None and is_launcher()):
        trainer = _fit(cfg, plan, callbacks + progress, bar, csv, staging, dashboard, state)
    if trainer.is_global_zero:
        discard_state(staging)  # the run is complete: nothing to resume
        finish({})
    return describe_device(trainer)


def _fit(cfg, plan, callbacks, bar, csv, staging, dashboard, state) -> L.Trainer:
    """The Trainer, after ``fit`` from ``state`` (None: from step 0)."""
    spec = plan.fit
    extra = {k: v for k, v in spec.trainer.items() if k != "callbacks"}
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=cfg.trainer.strategy,
        logger=fit_loggers(csv, staging, dashboard) or False,
        callbacks=callbacks,
        enable_progress_bar=bar,
        enable_model_summary=False,
        enable_checkpointing=False,  # tasks save their own checkpoints (state dicts at chosen steps)
        default_root_dir=str(staging),
        **extra,
    )
    with warnings.catch_warnings():
        # ResumeCallback repositions the batch sampler of a state saved mid-epoch itself
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(
            plan.module,
            train_dataloaders=spec.train,
            val_dataloaders=spec.val,
            ckpt_path=None if state is None else str(state.checkpoint),
        )
    return trainer
