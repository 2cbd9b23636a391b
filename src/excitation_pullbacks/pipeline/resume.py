"""Resumable training: on a resume signal a training run saves its state in its staging folder and stops; the
same command resumes from it, and the checkpoints come out bit for bit as in an uninterrupted run.

The state, in ``<staging>/resume/``::

    step_<N>.ckpt         Lightning's checkpoint (``Trainer.save_checkpoint``): model, optimizer, LR scheduler,
                          global step, loop progress, the callbacks' state (the checkpoints saved so far) and
                          the position in the seeded batch order (:class:`~.batches.GlobalBatches`)
    rng_<N>_rank<r>.pt    every RNG state of rank r (torch CPU and CUDA, numpy, Python)
    state.json            written last: {"step", "checkpoint", "config_hash", "world_size"}

:class:`ResumeCallback` checks the stop flag (:mod:`.signals`) after each optimizer step; under DDP the ranks
agree (the largest signal number any rank received wins), so all stop after the same step. With a resume
signal every rank saves there (the point Lightning's step checkpoints use, from which ``Trainer.fit(ckpt_path=)``
restarts) and the run stops at the next boundary - the next batch, the end of the epoch (after its
validation) or the end of training - so that the step's logs are written once. ``Trainer.fit(ckpt_path=)``
restores the state; the callback restores the RNG states and the batch position, which Lightning does not.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from excitation_pullbacks.stopping import Stopped

from .atomic import save_torch, write_text
from .batches import GlobalBatches
from .errors import OtherRankFailed
from .signals import received, take_over

__all__ = ["FOLDER", "ResumeCallback", "ResumeState", "discard_state", "read_state", "rng_states", "set_rng_states"]

#: The state's folder inside the staging folder.
FOLDER = "resume"
STATE = "state.json"


@dataclass(frozen=True)
class ResumeState:
    """A saved training state: the optimizer steps done, its Lightning checkpoint, and the config hash of
    the run that saved it."""

    step: int
    checkpoint: Path
    config_hash: str

    @property
    def folder(self) -> Path:
        return self.checkpoint.parent


def read_state(staging: Path, config_hash: str | None = None) -> ResumeState | None:
    """The resumable state in ``staging`` (None: none, unreadable, or - when ``config_hash`` is given - saved
    by a run of another config)."""
    folder = Path(staging) / FOLDER
    try:
        data = json.loads((folder / STATE).read_text())
        state = ResumeState(int(data["step"]), folder / str(data["checkpoint"]), str(data["config_hash"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not state.checkpoint.is_file() or (config_hash is not None and state.config_hash != config_hash):
        return None
    return state


def discard_state(staging: Path) -> None:
    """Remove the resumable state (the run finished: it is not part of the results)."""
    shutil.rmtree(Path(staging) / FOLDER, ignore_errors=True)


def rng_states() -> dict:
    """Every RNG state of this process: torch (CPU and each CUDA device), numpy, Python's ``random``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


class ResumeCallback(Callback):
    """Stops a training run between optimizer steps on a signal (see the module); with one of
    ``resume_signals`` it first saves the resumable state into ``staging/resume``.

    config_hash: the run's (a state of another config is never resumed). sampler: the training batches,
    repositioned when a state is loaded (None: not resumable, a signal only stops the run). Put it after every callback whose state belongs in the checkpoint
    (e.g. the step checkpoints), so that they have seen the step.
    """

    def __init__(self, staging: Path, config_hash: str, resume_signals, sampler: GlobalBatches | None):
        self.folder = Path(staging) / FOLDER
        self.config_hash = config_hash
        self.resume_signals = frozenset(int(s) for s in resume_signals) if sampler is not None else frozenset()
        self.sampler = sampler
        self.stop: str | None = None  # why the run stops at the next boundary

    # -- stopping ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        take_over()  # Lightning's SIGTERM handler would end the run with exit status 0 and no state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        local = torch.tensor(float(received() or 0), device=trainer.strategy.root_device)
        signum = int(trainer.strategy.reduce(local, reduce_op="max")) if trainer.world_size > 1 else int(local)
        if not signum or self.stop is not None:
            return
        name = signal.Signals(signum).name
        if signum in self.resume_signals:
            step = self._save(trainer)
            self.stop = f"stopped by {name} after step {step}"
        else:
            self.stop = f"stopped by {name}"

    def _raise_if_stopping(self) -> None:
        if self.stop is not None:
            raise Stopped(self.stop)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._raise_if_stopping()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._raise_if_stopping()

    def on_train_end(self, trainer, pl_module) -> None:
        self._raise_if_stopping()

    # -- saving and loading -----------------------------------------------------------------------------
    def _save(self, trainer) -> int:
        """Every rank: the Lightning checkpoint (rank 0 writes it), this rank's RNG states, then rank 0 the
        state file and the older states' removal. Returns the step. A write that fails on one rank fails the
        step on all (the ranks agree after each stage, where a failure would otherwise leave the others
        waiting in a barrier until the process group's timeout): that rank raises its error, the others
        :class:`~.errors.OtherRankFailed`."""
        step = int(trainer.global_step)
        name = f"step_{step:06d}.ckpt"
        partial = self.folder / f".{name}.partial"
        failed: BaseException | None = None
        try:
            if trainer.is_global_zero:
                self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            failed = err
        self._agree(trainer, failed)
        try:
            trainer.save_checkpoint(partial)  # collective: rank 0 writes, then every rank meets in a barrier
        except (OSError, RuntimeError) as err:  # torch's zip writer reports some write failures as RuntimeError
            failed = err
            if trainer.world_size > 1:  # the save's closing barrier, which its failure skipped
                trainer.strategy.barrier("Trainer.save_checkpoint")
        if failed is None:
            try:
                save_torch(rng_states(), self.folder / f"rng_{step:06d}_rank{trainer.global_rank}.pt")
            except OSError as err:
                failed = err
        self._agree(trainer, failed)
        if trainer.is_global_zero:
            try:
                partial.replace(self.folder / name)
                state = {
                    "step": step,
                    "checkpoint": name,
                    "config_hash": self.config_hash,
                    "world_size": trainer.world_size,
                }
                write_text(self.folder / STATE, json.dumps(state, indent=1) + "\n")
                for old in self.folder.iterdir():
                    if old.name != STATE and f"{step:06d}" not in old.name:
                        old.unlink(missing_ok=True)
            except OSError as err:
                failed = err
        self._agree(trainer, failed)
        return step

    @staticmethod
    def _agree(trainer, failed: BaseException | None) -> None:
        """A barrier that also tells every rank whether any failed: raises ``failed`` on the rank that has it,
        :class:`~.errors.OtherRankFailed` on the others."""
        anyone = failed is not None
        if trainer.world_size > 1:
            flag = torch.tensor(float(anyone), device=trainer.strategy.root_device)
            anyone = bool(trainer.strategy.reduce(flag, reduce_op="max"))
        if failed is not None:
            raise failed
        if anyone:
            raise OtherRankFailed("another process of this run could not save the resumable state (see its error)")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.sampler is None:
            return
        checkpoint["batch_position"] = {
            **self.sampler.position(int(trainer.global_step)),
            "batches_per_epoch": len(self.sampler),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        where = checkpoint.get("batch_position")
        if self.sampler is None or where is None or where["batches_per_epoch"] != len(self.sampler):
            raise ValueError(f"the resumable state in {self.folder} was saved with another batch order: remove it")
        self.sampler.resume_at(where["epoch"], where["batch"])
        rng = self.folder / f"rng_{int(checkpoint['global_step']):06d}_rank{trainer.global_rank}.pt"
        if rng.is_file():  # a rank the interrupted run did not have keeps its seeded state
            set_rng_states(torch.load(rng, weights_only=False))
