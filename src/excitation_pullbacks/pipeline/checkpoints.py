"""A training run's checkpoints: saved at chosen optimizer steps with their held-out accuracy
(:class:`CheckpointSteps`), listed in ``checkpoints/index.json`` and described by ``checkpoints/model.json``;
read back by :func:`read_checkpoints` and :func:`model_info` (the path_stability task, the app)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from excitation_pullbacks.models import DIGITS_CNN, ImageNetInput

from .atomic import save_torch, write_text
from .classes import class_names
from .errors import PipelineError
from .timing import timer_of

__all__ = ["INDEX", "MODEL", "CheckpointSteps", "model_info", "read_checkpoints", "saved_module"]

INDEX = "index.json"
MODEL = "model.json"


@torch.no_grad()
def _accuracy(model: nn.Module, held_out: DataLoader) -> float:
    """Accuracy of ``model`` (in eval mode for the count, its mode restored) on (image, label) batches."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in held_out:
        x, y = batch[0], batch[1]
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


def saved_module(model: nn.Module) -> nn.Module:
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
        self.folder.mkdir(parents=True, exist_ok=True)
        save_torch(saved_module(module.model).state_dict(), self.folder / name)
        timer = timer_of(trainer)
        if timer is None:
            acc = _accuracy(module.model, self.held_out)
        else:
            with timer.measure("held_out", module):  # a model pass over the held-out set, not overhead
                acc = _accuracy(module.model, self.held_out)
        self.saved.append({"step": step, "epoch": int(trainer.current_epoch), "test_acc": acc, "file": name})
        for logger in trainer.loggers:
            logger.log_metrics({"checkpoint/test_acc": acc}, step=step)
        write_text(self.folder / INDEX, json.dumps(self.saved, indent=1) + "\n")

    def state_dict(self) -> dict:
        """The checkpoints saved so far (a resumed run goes on from them)."""
        return {"saved": [dict(r) for r in self.saved]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved = [dict(r) for r in state_dict.get("saved", [])]

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


def model_info(folder: str | os.PathLike) -> dict:
    """What a train run's checkpoints are: {"name", "num_classes", "classes", "size"} from its
    ``checkpoints/model.json`` (or the run's results folder); runs without one are the digits CNN's."""
    folder = Path(os.path.expanduser(str(folder)))
    if (folder / "checkpoints" / INDEX).is_file():
        folder = folder / "checkpoints"
    if not (folder / MODEL).is_file():
        return {"name": DIGITS_CNN, "num_classes": 10, "classes": list(class_names("digits")), "size": 32}
    return json.loads((folder / MODEL).read_text())
