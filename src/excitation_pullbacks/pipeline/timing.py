"""How long a run's model passes take: one Lightning callback for every task, read by the run skeleton.

:class:`StepTimer` adds up the wall time from the start to the end of each predict or training batch in this
process (the step itself; for training also the backward pass and the optimizer step), waiting for the GPU's
queued kernels before it reads the clock. ``run`` hands it to the Trainer and writes ``timer.seconds`` into
``timing.json`` (model passes vs everything else).
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["StepTimer"]


class StepTimer(Callback):
    """Seconds spent in predict and training batches in this process (``seconds``). Put it first in the
    Trainer's callbacks, so that the other callbacks' batch-end work (checkpoints) is not counted."""

    def __init__(self):
        self.seconds = 0.0
        self._start: float | None = None

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def _begin(self, module) -> None:
        self._sync(module)
        self._start = time.perf_counter()

    def _end(self, module) -> None:
        if self._start is not None:
            self._sync(module)
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end(pl_module)
