"""The interface every task implements, and what the run skeleton hands it and gets back.

A task says what it computes per batch (a LightningModule whose ``predict_step`` returns a dict of CPU
tensors with a leading image axis, including ``row``) and how rank 0 turns the merged predictions into
files (:meth:`Task.finalize`). Everything else - output directory, staging, ranks, the Trainer, loggers,
config.yaml, timing, the final report - belongs to :mod:`..run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Fit", "Outputs", "Plan", "RunContext", "Task"]


@dataclass
class RunContext:
    """cfg: the composed config; resolved: it as a plain dict (what config.yaml and the loggers get);
    out: the output directory; staging: the folder results are written to; launcher: True in the process
    that started the run (not a DDP child)."""

    cfg: DictConfig
    resolved: dict
    out: Path
    staging: Path
    launcher: bool


@dataclass
class Fit:
    """A training run: the skeleton calls ``Trainer.fit`` of the plan's module on ``train`` (validating on
    ``val``) instead of ``Trainer.predict``, with ``trainer`` as extra Trainer arguments (max_steps,
    callbacks, deterministic, ...); rank 0 then calls the task's ``finalize`` with an empty dict."""

    train: Any
    val: Any = None
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What a task hands the run skeleton: the per-batch module and the images it runs on, row r = image r.

    images (N, C, H, W), labels (N,), index (N,) dataset indices (the skeleton times the module's steps with
    :class:`~..timing.StepTimer`). data: instead of the three tensors, a dataset whose item r is (image
    (C, H, W), label, dataset index, r), read batch by batch (images None). keep_first: {prediction key: n} -
    per-image results the task needs only for rows < n (e.g. the images and maps its figure draws); the
    others are dropped as the batches are written. fit: a training run (:class:`Fit`) instead of predict over
    the images.
    """

    module: L.LightningModule
    images: Tensor | None
    labels: Tensor | None
    index: Tensor | None
    fit: Fit | None = None
    data: Dataset | None = None
    keep_first: dict[str, int] = field(default_factory=dict)


@dataclass
class Outputs:
    """What a task's finalize leaves for the skeleton to save and log: figures {key: (PIL image, caption)}
    (saved as ``<key>.png``), a table (header row, then rows; logged as the ``metrics`` table), summary
    scalars (the run's results: at ``gate.temperature`` where a metric depends on T), and ``by_temperature``:
    one record per (method, T) - {"method": str, "temperature": float, metric: number, ...} - that the
    dashboard plots against T and logs as the ``by_temperature`` table; ``tables``: more tables to log by name
    (header row, then rows). The task writes its own files
    (tensors, CSV, JSON) into the staging folder itself."""

    figures: dict[str, tuple[Any, str]] = field(default_factory=dict)
    table: list[list] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    by_temperature: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[list]] = field(default_factory=dict)


class Task:
    """One kind of run (``task: <name>`` in the config). Instances must be picklable (ddp_spawn)."""

    name: str = ""

    def validate(self, cfg: DictConfig) -> None:
        """Raise PipelineError for a config this task cannot run, before any output is touched."""

    def plan(self, ctx: RunContext) -> Plan:
        """Build the model, data and per-batch module (on every rank)."""
        raise NotImplementedError

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        """Rank 0, after the merge: write the task's files into ``staging``; return what to save and log."""
        raise NotImplementedError

    def resume_signals(self, cfg: DictConfig) -> tuple[int, ...]:
        """The signals on which a training task saves a resumable state before it stops (:mod:`..resume`);
        none for tasks that are not resumable."""
        return ()

    def result(self, final: Path) -> dict:
        """Extra entries of ``run(cfg)``'s return value, read from a finished ``results`` folder."""
        return {}
