"""Gathering ``Trainer.predict`` results across ranks: one shard file per rank, merged on rank 0.

``trainer.predict`` returns only the local rank's results (nothing under ddp_spawn) and ranks may hold
uneven image counts, so every rank saves its predictions, a barrier waits for all of them, and rank 0
concatenates them in row order and hands them to ``finalize``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .outputs import save_tensors

__all__ = ["ResultWriter", "merge_shards"]


def merge_shards(shards: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-rank prediction dicts along the image axis and sort by ``row``."""
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = merged["row"].argsort()
    return {k: v[order] for k, v in merged.items()}


class ResultWriter(BasePredictionWriter):
    """Writes ``staging/shards/rank<r>.pt`` on every rank; rank 0 merges after a barrier and calls
    ``finalize(merged)``. ``finalize`` must be picklable (ddp_spawn)."""

    def __init__(self, staging: str | os.PathLike, finalize: Callable[[dict[str, Tensor]], None]):
        super().__init__(write_interval="epoch")
        self.staging = Path(staging)
        self.finalize = finalize

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        shard_dir = self.staging / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        shard = {k: torch.cat([p[k] for p in preds]) for k in preds[0]} if preds else {}
        save_tensors(shard, shard_dir / f"rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("shards written")
        error = None
        if trainer.is_global_zero:
            try:
                shards = [torch.load(shard_dir / f"rank{r}.pt", weights_only=True) for r in range(trainer.world_size)]
                shutil.rmtree(shard_dir)
                self.finalize(merge_shards([s for s in shards if s]))
            except BaseException as err:  # noqa: BLE001 - re-raised after the barrier so other ranks do not hang
                error = err
        trainer.strategy.barrier("results written")
        if error is not None:
            raise error
