"""The train task's per-step module: cross-entropy training with Adam and a cosine decay."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import random_flip, random_shift
from ..batches import generator_for

__all__ = ["TrainModule"]


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

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> Tensor:
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
