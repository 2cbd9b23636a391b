"""How long a run's model passes take: one Lightning callback for every task, read by the run skeleton.

:class:`StepTimer` adds up, per part, the wall time of this process's model passes, waiting for the GPU's
queued kernels before it reads the clock:
  ``steps``       predict or training batches (for training also the backward pass and the optimizer step);
  ``validation``  Lightning's validation batches (a training run's held-out loss and accuracy per epoch);
  ``held_out``    other passes over held-out data that callbacks time with :meth:`StepTimer.measure` (the held-out
                  accuracy of each saved checkpoint).
``run`` hands it to the Trainer and writes the parts into ``timing.json`` (model passes vs everything else).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["PARTS", "StepTimer", "timer_of"]

PARTS = ("steps", "validation", "held_out")


class StepTimer(Callback):
    """Seconds spent in model passes in this process: ``parts`` {part: seconds} (:data:`PARTS`), ``seconds`` their
    sum. Put it first in the Trainer's callbacks, so that the other callbacks' batch-end work is not counted
    as a step."""

    def __init__(self):
        self.parts = dict.fromkeys(PARTS, 0.0)
        self._start: float | None = None
        self._device: torch.device | None = None

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    def _sync(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _begin(self, module) -> None:
        self._device = module.device
        self._sync()
        self._start = time.perf_counter()

    def _end(self, part: str) -> None:
        if self._start is not None:
            self._sync()
            self.parts[part] += time.perf_counter() - self._start
            self._start = None

    @contextmanager
    def measure(self, part: str, module) -> Iterator[None]:
        """Add the block's wall time to ``part`` (one of :data:`PARTS`); ``module``: the LightningModule."""
        if part not in self.parts:
            raise ValueError(f"unknown part {part!r}; one of {PARTS}")
        self._begin(module)
        try:
            yield
        finally:
            self._end(part)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end("steps")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end("steps")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end("validation")


def timer_of(trainer) -> StepTimer | None:
    """The trainer's StepTimer callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
