"""The ``train`` task: train a ReLU CNN with a seeded schedule and keep checkpoints at chosen steps.

``Trainer.fit`` (the skeleton's training branch) of ``model`` (the digits CNN, or any torchvision classifier,
randomly initialised or fine-tuned from a weights enum with a fresh head for the data's class count) on

- ``data=digits``: the digits train split, the test split held out;
- ``data=folder``: an image folder with one sub-folder per class (torchvision's ImageFolder layout), a seeded
  stratified ``train.val_fraction`` of each class held out;

Adam with a cosine learning-rate decay over the run, one random shift of up to ``train.shift`` pixels (and a
horizontal flip with ``train.flip``) per batch, batches in a seeded order (:mod:`..batches`: the same global
batches on one process and under DDP), the model initialised from ``seed``; deterministic on the CPU (two
runs give identical checkpoints). Loss and accuracy per step, the validation loss and accuracy per epoch and
the held-out accuracy at every checkpoint go to the run's loggers. Rank 0 writes::

    results/  checkpoints/step_<000000>.pt (state dicts of the model after that many optimizer steps; step 0
              is the initialisation; torchvision models without the [-1, 1] input wrapper, so that
              ``build_model(name, None, checkpoint=..., num_classes=...)`` loads them), checkpoints/index.json,
              checkpoints/model.json (name, num_classes, class names, image size), checkpoints.csv (step,
              epoch, held-out accuracy, file), training.png (loss and accuracy curves), csv_train/metrics.csv
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from excitation_pullbacks.models import build_model
from excitation_pullbacks.models.digits import digits_images

from ..atomic import write_text
from ..batches import GlobalBatches
from ..charts import figure_image
from ..checkpoints import MODEL, CheckpointSteps, read_checkpoints
from ..classes import class_names
from ..errors import PipelineError
from ..image_folder import class_folder, stratified_split
from ..modules import TrainModule
from ..outputs import write_csv
from ..signals import parse_signals
from .base import Fit, Outputs, Plan, RunContext, Task

__all__ = ["TrainTask"]

DATA_KINDS = ("digits", "folder")
#: The signals on which a training run saves its state and stops (``train.resume_signals``).
RESUME_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def _curves(metrics: Path, saved: list[dict]) -> Figure:
    """Training loss and accuracy per step and the held-out accuracy at each checkpoint."""
    steps, loss, acc = [], [], []
    if metrics.is_file():
        with metrics.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    steps.append(int(row["step"]))
                    loss.append(float(row["train/loss"]))
                    acc.append(float(row["train/acc"]))
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, loss, lw=0.8)
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title="loss per step")
    ax2.plot(steps, acc, lw=0.6, alpha=0.6, label="training batch")
    ax2.plot([r["step"] for r in saved], [r["test_acc"] for r in saved], "o-", ms=3, label="held out (checkpoints)")
    ax2.set(xlabel="step", ylabel="accuracy", xscale="symlog", title="accuracy")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


class TrainTask(Task):
    """``task: train``: a seeded training run of ``model`` on ``data`` (digits or a class folder) with
    checkpoints at ``train.checkpoint_steps``."""

    name = "train"

    def validate(self, cfg) -> None:
        t = cfg.get("train")
        if t is None:
            raise PipelineError("task=train needs a train config (experiment=train_digits or experiment=train_folder)")
        if cfg.data.kind not in DATA_KINDS:
            raise PipelineError(
                f"task=train trains on data=digits or data=folder (one sub-folder per class), not data={cfg.data.kind}"
            )
        if int(t.epochs) < 1 or int(t.batch_size) < 1:
            raise PipelineError("train.epochs and train.batch_size must be >= 1")
        if cfg.data.kind == "folder" and not 0 < float(t.get("val_fraction", 0.2)) < 1:
            raise PipelineError(f"train.val_fraction must be in (0, 1), got {t.get('val_fraction')}")
        self.resume_signals(cfg)
        steps = list(t.checkpoint_steps)
        if any(not isinstance(s, int) or s < 0 for s in steps):
            raise PipelineError(f"train.checkpoint_steps must be steps >= 0, got {steps}")

    def resume_signals(self, cfg) -> tuple[int, ...]:
        """``train.resume_signals`` (names or numbers; default SIGTERM, SIGINT, SIGUSR1)."""
        try:
            return tuple(int(s) for s in parse_signals(cfg.train.get("resume_signals", RESUME_SIGNALS) or []))
        except ValueError as err:
            raise PipelineError(f"train.resume_signals: {err}") from None

    def _data(self, cfg) -> tuple[TensorDataset | Subset, TensorDataset | Subset, list[str], int]:
        """-> training set, held-out set (both (image (3, S, S) in [-1, 1], label) items), class names, S."""
        t = cfg.train
        if cfg.data.kind == "digits":
            x, y = digits_images("train", int(t.size))
            if t.get("subset"):
                x, y = x[: int(t.subset)], y[: int(t.subset)]
            held_out = TensorDataset(*digits_images("test", int(t.size)))
            return TensorDataset(x, y), held_out, list(class_names("digits")), int(t.size)
        folder = class_folder(cfg.data)
        train, val = stratified_split(folder.labels, float(t.val_fraction), int(t.split_seed))
        if t.get("subset"):
            train = train[: int(t.subset)]
        if len(val) == 0:
            raise PipelineError(f"no class of {cfg.data.root} has 2 images or more: nothing to hold out for validation")
        return Subset(folder, train.tolist()), Subset(folder, val.tolist()), folder.classes, int(cfg.data.crop)

    def plan(self, ctx: RunContext) -> Plan:
        cfg, t, seed = ctx.cfg, ctx.cfg.train, int(ctx.cfg.seed)
        train_set, held_out, classes, size = self._data(cfg)
        batches = GlobalBatches(len(train_set), int(t.batch_size), seed, drop_last=bool(t.get("drop_last", False)))
        if len(batches) == 0:
            raise PipelineError(
                f"{len(train_set)} training images make no batch of train.batch_size={t.batch_size} "
                "(train.drop_last=true): lower train.batch_size"
            )
        max_steps = int(t.epochs) * len(batches)
        steps = sorted({s for s in t.checkpoint_steps if s <= max_steps} | {max_steps})
        torch.manual_seed(seed)
        name = str(cfg.model.name)
        model = build_model(
            name, cfg.model.weights, checkpoint=cfg.model.get("checkpoint"), num_classes=len(classes)
        ).train()
        self._check_logits(model, name, train_set[0][0], len(classes))
        module = TrainModule(
            model,
            lr=t.lr,
            weight_decay=t.weight_decay,
            max_steps=max_steps,
            shift=t.shift,
            seed=seed,
            flip=bool(t.get("flip", False)),
        )
        workers = int(t.get("num_workers", 0))
        train = DataLoader(train_set, batch_sampler=batches, num_workers=workers)
        val = DataLoader(held_out, batch_size=max(int(t.batch_size), 64), num_workers=workers)
        callback = CheckpointSteps(steps, ctx.staging / "checkpoints", val)
        self.info = {"name": name, "num_classes": len(classes), "classes": classes, "size": size}
        trainer = {
            "max_steps": max_steps,
            "callbacks": [callback],
            "deterministic": True,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "use_distributed_sampler": False,  # GlobalBatches splits each global batch across the ranks
            # under DDP on GPUs: BatchNorm statistics of the global batch, as on one process (torch's SyncBatchNorm
            # has no CPU version: DDP on CPUs normalises each rank's part by its own statistics)
            "sync_batchnorm": str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available(),
        }
        empty = torch.empty(0, dtype=torch.long)
        return Plan(module, torch.empty(0, 3, size, size), empty, empty, fit=Fit(train, val, trainer))

    @staticmethod
    def _check_logits(model: nn.Module, name: str, example: Tensor, num_classes: int) -> None:
        """PipelineError unless ``model`` in training mode maps images to (B, num_classes) logits (a copy runs
        on ``example`` (3, S, S), twice; torch's random state is left as it was)."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = copy.deepcopy(model).train()(example.expand(2, -1, -1, -1))
        if not isinstance(out, Tensor) or out.shape != (2, num_classes):
            what = type(out).__name__ if not isinstance(out, Tensor) else f"a tensor of shape {tuple(out.shape)}"
            raise PipelineError(
                f"model {name} returns {what} in training mode, not logits (2, {num_classes}): its classifier "
                "head cannot be trained here (auxiliary heads?); choose another model"
            )

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        saved = read_checkpoints(staging)
        write_text(staging / "checkpoints" / MODEL, json.dumps(self.info, indent=1) + "\n")
        rows = [
            {"step": r["step"], "epoch": r["epoch"], "test_acc": f"{r['test_acc']:.6f}", "file": r["file"]}
            for r in saved
        ]
        write_csv(staging / "checkpoints.csv", rows, ["step", "epoch", "test_acc", "file"])
        table = [["step", "epoch", "test_acc"]] + [[r["step"], r["epoch"], r["test_acc"]] for r in saved]
        fig = figure_image(_curves(staging / "csv_train" / "metrics.csv", saved))
        caption = "training loss per step; accuracy per batch and on the held-out split at each checkpoint"
        summary = {"final_test_acc": saved[-1]["test_acc"], "final_step": float(saved[-1]["step"])}
        return Outputs({"training": (fig, caption)}, table, summary)
