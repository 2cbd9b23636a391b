"""Writing ``Trainer.predict`` results as they are made and merging them on rank 0.

Every rank saves each batch's predictions as a shard in the staging folder (:class:`~.shards.ShardStore`), so
nothing accumulates in memory and an interrupted run keeps what it computed. At the end of the pass a barrier
waits for all ranks; rank 0 merges the shards in row order, hands them to ``finalize`` and removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .shards import ShardStore

__all__ = ["ResultWriter"]


class ResultWriter(BasePredictionWriter):
    """Saves each predict batch (one chunk of ``batch_size`` rows, :class:`~.batches.RowChunks`) as a shard
    on the rank that computed it; rank 0 merges the ``chunks`` shards after a barrier and calls
    ``finalize(merged)``. keep_first: {key: n} - keep ``key`` only for rows < n (see :mod:`.shards`).
    Picklable (ddp_spawn) when ``finalize`` is."""

    def __init__(
        self,
        store: ShardStore,
        chunks: int,
        batch_size: int,
        finalize: Callable[[dict[str, Tensor]], None],
        keep_first: Mapping[str, int] | None = None,
    ):
        super().__init__(write_interval="batch")
        self.store, self.chunks, self.batch_size = store, int(chunks), int(batch_size)
        self.finalize = finalize
        self.keep_first = dict(keep_first or {})
        self.computed = 0  # shards this process wrote

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        chunk = int(prediction["row"][0]) // self.batch_size
        self.store.write(chunk, trainer.global_rank, prediction, self.keep_first)
        self.computed += 1

    def merge(self) -> None:
        """Rank 0 (or the launcher when every shard was there): merge, ``finalize``, remove the shards."""
        self.finalize(self.store.merge(self.chunks))
        self.store.discard()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("shards written")
        error = None
        if trainer.is_global_zero:
            try:
                self.merge()
            except BaseException as err:  # noqa: BLE001 - re-raised after the barrier so other ranks do not hang
                error = err
        trainer.strategy.barrier("results written")
        if error is not None:
            raise error
