"""Seeded training batches that are the same on one process and on W DDP processes, and the row chunks of a
predict run.

Pass (epoch) e draws one permutation of the training set from a generator seeded by (seed, e), the same on
every rank (:func:`generator_for`; no generator is held between passes, so the sampler pickles into
DDP-spawned processes as plain numbers). Step s's global batch is the permutation's s-th run of ``batch_size``
indices (``drop_last``: a last, shorter run is left out; one image alone cannot pass BatchNorm in training).
One process takes the whole global batch; under DDP rank r takes the r-th of W equal, contiguous parts, so
the ranks together see exactly the one-process batch at every step, and DDP's averaged gradient is the
one-process gradient when the parts have equal sizes and the forward of a part does not depend on the
others' (it does through BatchNorm's batch statistics unless they are synchronised, and through dropout
masks). A global batch that does not split evenly is filled up by repeating its first images (as torch's
DistributedSampler pads), so every rank always has a batch.

A predict run (:class:`RowChunks`) goes through its rows in chunks of ``batch_size`` consecutive rows, the same
batches on one process and on W: rank r takes every W-th of the chunks still to compute, so a resumed run
computes the missing chunks only and every batch holds the same images as in an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["GlobalBatches", "RowChunks", "generator_for"]


def generator_for(*keys: int) -> torch.Generator:
    """A CPU generator seeded from the integers ``keys`` (e.g. (seed, epoch)), well mixed: distinct keys give
    unrelated streams."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


class GlobalBatches(Sampler[list[int]]):
    """A batch sampler over ``n`` items: ``batch_size`` items per step in a seeded order (see the module);
    ``drop_last``: leave out each epoch's last, shorter batch.

    The rank and world size are read from ``torch.distributed`` when the batches are drawn (after the Trainer
    set DDP up); the Trainer must not wrap it in a DistributedSampler (``use_distributed_sampler=False``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False):
        self.n, self.batch_size, self.drop_last = int(n), int(batch_size), bool(drop_last)
        self.seed, self.epoch = int(seed), 0  # epoch: the passes drawn so far
        self.skip = 0  # batches the next pass leaves out (a resumed run starts mid-pass)

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def epoch_batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        """The batches rank ``rank`` of ``world`` takes in pass ``epoch`` (0, 1, ...): lists of item indices."""
        order = torch.randperm(self.n, generator=generator_for(self.seed, epoch))
        out = []
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if world > 1:
                part = -(-len(batch) // world)
                batch = batch.repeat(-(-part * world // len(batch)))[: part * world]
                batch = batch[rank * part : (rank + 1) * part]
            out.append(batch.tolist())
        return out

    def position(self, step: int) -> dict[str, int]:
        """Where optimizer step ``step`` (batches done so far, one per step) is in the seeded order:
        {"epoch": pass, "batch": batches of that pass done}."""
        return {"epoch": step // len(self), "batch": step % len(self)}

    def resume_at(self, epoch: int, batch: int) -> None:
        """Make the next pass pass ``epoch``, leaving out its first ``batch`` batches (a resumed run)."""
        self.epoch, self.skip = int(epoch), int(batch)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._world()
        self.epoch += 1
        skip, self.skip = self.skip, 0
        yield from self.epoch_batches(self.epoch - 1, rank, world)[skip:]


class RowChunks(Sampler[list[int]]):
    """A batch sampler over the rows 0 .. n-1 of a predict run: chunk c is rows ``[c * size, (c + 1) * size)``
    (the last one shorter); it yields the chunks in ``todo`` this rank takes - rank r of W takes
    ``todo[r::W]``, and a rank left without one (fewer chunks than ranks) repeats ``todo[r % len(todo)]`` so
    that every rank has a batch. The rank is read from ``torch.distributed`` when the batches are drawn; the
    Trainer must not wrap it (``use_distributed_sampler=False``)."""

    def __init__(self, n: int, size: int, todo):
        self.n, self.size, self.todo = int(n), int(size), [int(c) for c in todo]

    def chunks(self) -> list[int]:
        """The chunks this rank takes (see the class)."""
        rank, world = GlobalBatches._world()
        if not self.todo:
            return []
        return self.todo[rank::world] or [self.todo[rank % len(self.todo)]]

    def __len__(self) -> int:
        return len(self.chunks())

    def __iter__(self) -> Iterator[list[int]]:
        for c in self.chunks():
            yield list(range(c * self.size, min((c + 1) * self.size, self.n)))
