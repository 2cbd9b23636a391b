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
import os
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from excitation_pullbacks.models import DIGITS_CNN, ImageNetInput, build_model
from excitation_pullbacks.models.checkpoint import save_state_dict
from excitation_pullbacks.models.digits import digits_images

from ..batches import GlobalBatches, generator_for
from ..charts import figure_image
from ..classes import class_names
from ..errors import PipelineError
from ..image_folder import class_folder, stratified_split
from ..signals import check_stop
from .base import Fit, Outputs, Plan, RunContext, Task

__all__ = ["CheckpointSteps", "TrainModule", "TrainTask", "model_info", "random_shift", "read_checkpoints"]

INDEX = "index.json"
MODEL = "model.json"
DATA_KINDS = ("digits", "folder")


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """x (B, C, H, W) translated by one random (dy, dx) in [-shift, shift]^2, the background -1 filled in."""
    if shift <= 0:
        return x
    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    return padded[..., shift - dy : shift - dy + h, shift - dx : shift - dx + w]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """x (B, C, H, W), mirrored left-right with probability 1/2 (one coin for the batch)."""
    return x.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else x


class TrainModule(L.LightningModule):
    """Cross-entropy training of ``model`` (images (B, 3, H, W) in [-1, 1] -> logits) with Adam and a cosine
    decay over ``max_steps``; each batch shifted by up to ``shift`` pixels and, with ``flip``, mirrored with
    probability 1/2 (seeded by ``seed``; every DDP rank draws the same, so the ranks' parts of a global batch
    are augmented as one batch)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        max_steps: int,
        shift: int,
        seed: int,
        flip: bool = False,
    ):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.max_steps = float(lr), float(weight_decay), int(max_steps)
        self.shift, self.seed, self.flip = int(shift), int(seed), bool(flip)
        self.model_seconds = 0.0  # wall time of training steps in this process

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        start = time.perf_counter()
        x, y = batch[0], batch[1]
        draws = generator_for(self.seed, self.global_step)  # the step's own stream: nothing to pickle or resume
        x = random_shift(x, self.shift, draws)
        if self.flip:
            x = random_flip(x, draws)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        # sync_dist: under DDP the mean over the ranks' (equal) parts, i.e. over the global batch
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(y), sync_dist=True)
        self.log("train/acc", acc, on_step=True, on_epoch=False, batch_size=len(y), sync_dist=True)
        self.model_seconds += time.perf_counter() - start
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.max_steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def _accuracy(model: nn.Module, held_out: DataLoader) -> float:
    """Accuracy of ``model`` (in eval mode for the count, its mode restored) on (image, label) batches."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in held_out:
        check_stop()
        x, y = batch[0], batch[1]
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


def _saved_module(model: nn.Module) -> nn.Module:
    """The module whose state dict a checkpoint holds: a torchvision backbone without its input wrapper."""
    return model.backbone if isinstance(model, ImageNetInput) else model


class CheckpointSteps(L.Callback):
    """Saves the model's state dict after each optimizer step in ``steps`` (0: before the first) on rank 0,
    with its accuracy on ``held_out`` ((image, label) batches), into ``folder/step_<step>.pt``, and
    ``folder/index.json``."""

    def __init__(self, steps, folder: Path, held_out: DataLoader):
        self.steps, self.folder, self.held_out = sorted({int(s) for s in steps}), Path(folder), held_out
        self.saved: list[dict] = []

    def _save(self, trainer, module) -> None:
        step = int(trainer.global_step)
        if step not in self.steps or any(r["step"] == step for r in self.saved) or not trainer.is_global_zero:
            return
        name = f"step_{step:06d}.pt"
        save_state_dict(_saved_module(module.model), self.folder / name)
        acc = _accuracy(module.model, self.held_out)
        self.saved.append({"step": step, "epoch": int(trainer.current_epoch), "test_acc": acc, "file": name})
        for logger in trainer.loggers:
            logger.log_metrics({"checkpoint/test_acc": acc}, step=step)
        tmp = self.folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(self.saved, indent=1) + "\n")
        os.replace(tmp, self.folder / INDEX)

    def on_train_start(self, trainer, module) -> None:
        self._save(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        check_stop()  # SIGINT/SIGTERM: stop between steps (nothing is published)

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


def model_info(folder: str | os.PathLike) -> dict:
    """What a train run's checkpoints are: {"name", "num_classes", "classes", "size"} from its
    ``checkpoints/model.json`` (or the run's results folder); runs without one are the digits CNN's."""
    folder = Path(os.path.expanduser(str(folder)))
    if (folder / "checkpoints" / INDEX).is_file():
        folder = folder / "checkpoints"
    if not (folder / MODEL).is_file():
        return {"name": DIGITS_CNN, "num_classes": 10, "classes": list(class_names("digits")), "size": 32}
    return json.loads((folder / MODEL).read_text())


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
        steps = list(t.checkpoint_steps)
        if any(not isinstance(s, int) or s < 0 for s in steps):
            raise PipelineError(f"train.checkpoint_steps must be steps >= 0, got {steps}")

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
        (staging / "checkpoints" / MODEL).write_text(json.dumps(self.info, indent=1) + "\n")
        with (staging / "checkpoints.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["step", "epoch", "test_acc", "file"])
            writer.writerows([r["step"], r["epoch"], f"{r['test_acc']:.6f}", r["file"]] for r in saved)
        table = [["step", "epoch", "test_acc"]] + [[r["step"], r["epoch"], r["test_acc"]] for r in saved]
        fig = figure_image(_curves(staging / "csv_train" / "metrics.csv", saved))
        caption = "training loss per step; accuracy per batch and on the held-out split at each checkpoint"
        summary = {"final_test_acc": saved[-1]["test_acc"], "final_step": float(saved[-1]["step"])}
        return Outputs({"training": (fig, caption)}, table, summary)
