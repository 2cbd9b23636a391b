"""The ``train`` task: train a ReLU CNN with a seeded schedule and keep checkpoints at chosen steps.

``Trainer.fit`` (the skeleton's training branch) of the digits CNN on the digits train split: Adam with a
cosine learning-rate decay over the run, random shifts of up to ``train.shift`` pixels, batches in a seeded
order, the model initialised from ``seed``; deterministic on the CPU (two runs give identical checkpoints).
Loss and accuracy per step and the held-out accuracy at every checkpoint go to the run's loggers. Rank 0
writes::

    results/  checkpoints/step_<000000>.pt (state dicts of the model after that many optimizer steps; step 0
              is the initialisation), checkpoints/index.json, checkpoints.csv (step, epoch, test accuracy,
              file), training.png (loss and accuracy curves), csv_train/metrics.csv (every logged step)
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from excitation_pullbacks.models.checkpoint import save_state_dict
from excitation_pullbacks.models.digits import DigitsCNN, digits_images

from ..charts import figure_image
from ..errors import PipelineError
from .base import Fit, Outputs, Plan, RunContext, Task

__all__ = ["CheckpointSteps", "TrainModule", "TrainTask", "random_shift", "read_checkpoints"]

INDEX = "index.json"


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """x (B, C, H, W) translated by one random (dy, dx) in [-shift, shift]^2, the background -1 filled in."""
    if shift <= 0:
        return x
    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    return padded[..., shift - dy : shift - dy + h, shift - dx : shift - dx + w]


class TrainModule(L.LightningModule):
    """Cross-entropy training of ``model`` (images (B, 3, H, W) in [-1, 1] -> logits) with Adam and a cosine
    decay over ``max_steps``; batches shifted by up to ``shift`` pixels (seeded by ``seed``)."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_steps: int, shift: int, seed: int):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.max_steps = float(lr), float(weight_decay), int(max_steps)
        self.shift, self.seed = int(shift), int(seed)
        self.shifts = torch.Generator().manual_seed(self.seed)
        self.model_seconds = 0.0  # wall time of training steps in this process

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        start = time.perf_counter()
        x, y = batch[0], batch[1]
        logits = self.model(random_shift(x, self.shift, self.shifts))
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=True, on_epoch=False, batch_size=len(y))
        self.model_seconds += time.perf_counter() - start
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.max_steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x.to(next(model.parameters()).device)).argmax(1).cpu() == y).float().mean())
    model.train(was)
    return acc


class CheckpointSteps(L.Callback):
    """Saves the model's state dict after each optimizer step in ``steps`` (0: before the first) on rank 0,
    with its held-out accuracy on (x, y), into ``folder/step_<step>.pt``, and ``folder/index.json``."""

    def __init__(self, steps, folder: Path, x: Tensor, y: Tensor):
        self.steps, self.folder, self.x, self.y = sorted({int(s) for s in steps}), Path(folder), x, y
        self.saved: list[dict] = []

    def _save(self, trainer, module) -> None:
        step = int(trainer.global_step)
        if step not in self.steps or any(r["step"] == step for r in self.saved) or not trainer.is_global_zero:
            return
        name = f"step_{step:06d}.pt"
        save_state_dict(module.model, self.folder / name)
        acc = _accuracy(module.model, self.x, self.y)
        self.saved.append({"step": step, "epoch": int(trainer.current_epoch), "test_acc": acc, "file": name})
        for logger in trainer.loggers:
            logger.log_metrics({"checkpoint/test_acc": acc}, step=step)
        tmp = self.folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(self.saved, indent=1) + "\n")
        os.replace(tmp, self.folder / INDEX)

    def on_train_start(self, trainer, module) -> None:
        self._save(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._save(trainer, module)


def read_checkpoints(folder: str | os.PathLike) -> list[dict]:
    """The checkpoints a train run saved: its ``checkpoints/`` folder (or the run's results folder) -> rows
    {"step", "epoch", "test_acc", "path"} sorted by step. PipelineError when there are none."""
    folder = Path(os.path.expanduser(str(folder)))
    if (folder / "checkpoints" / INDEX).is_file():
        folder = folder / "checkpoints"
    index = folder / INDEX
    if not index.is_file():
        raise PipelineError(f"{folder} holds no checkpoints (no {INDEX}); run task=train first")
    rows = json.loads(index.read_text())
    return sorted(({**r, "path": folder / r["file"]} for r in rows), key=lambda r: r["step"])


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
    """``task: train``: a seeded training run of the digits CNN with checkpoints at ``train.checkpoint_steps``."""

    name = "train"

    def validate(self, cfg) -> None:
        t = cfg.get("train")
        if t is None:
            raise PipelineError("task=train needs a train config (experiment=train_digits)")
        if t.model != "digits_cnn":
            raise PipelineError(f"train.model={t.model!r}: only digits_cnn can be trained so far")
        if int(t.epochs) < 1 or int(t.batch_size) < 1:
            raise PipelineError("train.epochs and train.batch_size must be >= 1")
        steps = list(t.checkpoint_steps)
        if any(not isinstance(s, int) or s < 0 for s in steps):
            raise PipelineError(f"train.checkpoint_steps must be steps >= 0, got {steps}")

    def plan(self, ctx: RunContext) -> Plan:
        t, seed = ctx.cfg.train, int(ctx.cfg.seed)
        x, y = digits_images("train", int(t.size))
        x_test, y_test = digits_images("test", int(t.size))
        if t.get("subset"):
            x, y = x[: int(t.subset)], y[: int(t.subset)]
        steps_per_epoch = -(-len(y) // int(t.batch_size))
        max_steps = int(t.epochs) * steps_per_epoch
        steps = sorted({s for s in t.checkpoint_steps if s <= max_steps} | {max_steps})
        torch.manual_seed(seed)
        model = DigitsCNN()
        module = TrainModule(model, lr=t.lr, weight_decay=t.weight_decay, max_steps=max_steps, shift=t.shift, seed=seed)
        order = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(x, y), batch_size=int(t.batch_size), shuffle=True, generator=order)
        val = DataLoader(TensorDataset(x_test, y_test), batch_size=512)
        callback = CheckpointSteps(steps, ctx.staging / "checkpoints", x_test, y_test)
        trainer = {
            "max_steps": max_steps,
            "callbacks": [callback],
            "deterministic": True,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
        }
        return Plan(module, x, y, torch.arange(len(y)), fit=Fit(train, val, trainer))

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        saved = read_checkpoints(staging)
        with (staging / "checkpoints.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["step", "epoch", "test_acc", "file"])
            writer.writerows([r["step"], r["epoch"], f"{r['test_acc']:.6f}", r["file"]] for r in saved)
        table = [["step", "epoch", "test_acc"]] + [[r["step"], r["epoch"], r["test_acc"]] for r in saved]
        fig = figure_image(_curves(staging / "csv_train" / "metrics.csv", saved))
        caption = "training loss per step; accuracy per batch and on the held-out split at each checkpoint"
        summary = {"final_test_acc": saved[-1]["test_acc"], "final_step": float(saved[-1]["step"])}
        return Outputs({"training": (fig, caption)}, table, summary)
