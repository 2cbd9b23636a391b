"""What a run prints: progress (Lightning's bar in a terminal, plain periodic lines otherwise), each log line
once (Lightning's own lines go through the same handlers as ours: console and the job's log file), no
third-party adverts or dependency deprecation notices, and the end-of-run report in the log file too."""

from __future__ import annotations

import logging
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["LineProgress", "describe_device", "progress_callbacks", "say", "tidy_logging"]

log = logging.getLogger("excitation_pullbacks.progress")

#: Lightning's loggers: their own stream handlers are replaced by the root's (console + log file).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropAdverts(logging.Filter):
    """Drops Lightning's product tips ("Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: " not in record.getMessage()


def tidy_logging() -> None:
    """Route Lightning's lines through the root logger's handlers once each, drop its adverts, and silence
    a deprecation notice Lightning triggers in torch (nothing the user can act on). Idempotent."""
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root_has_handlers:
            for h in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(h)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class LineProgress(L.Callback):
    """Plain progress lines for a log file or a pipe: one line at most every ``every_s`` seconds and one at
    the end, with the batches (or steps) done, the elapsed time and an estimate of the time left."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = float(every_s)
        self._start = self._last = 0.0

    def _begin(self) -> None:
        self._start = self._last = time.perf_counter()

    def _tick(self, what: str, done: int, total: float) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self._start
        if total and total != float("inf"):
            left = elapsed / max(done, 1) * (total - done)
            log.info(
                "%s: %d/%d (%d%%), %.0f s elapsed, ~%.0f s left", what, done, total, 100 * done / total, elapsed, left
            )
        else:
            log.info("%s: %d, %.0f s elapsed", what, done, elapsed)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._begin()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.is_global_zero:
            total = sum(trainer.num_predict_batches) if trainer.num_predict_batches else 0
            self._tick("predict batches", batch_idx + 1, total)

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            total = (
                trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
            )
            self._tick("training steps", trainer.global_step, total)


def progress_callbacks(stream=None) -> tuple[list, bool]:
    """(callbacks, enable_progress_bar) for a Trainer: Lightning's bar when ``stream`` (stderr) is a terminal,
    else :class:`LineProgress`."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return [TQDMProgressBar()], True
    return [LineProgress()], False


def say(text: str) -> None:
    """Print ``text`` to stdout and append it to the job's log file(s) (the root logger's file handlers)."""
    print(text, flush=True)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.flush()
            with open(h.baseFilename, "a", encoding=h.encoding or "utf-8") as f:
                f.write(text + "\n")


def describe_device(trainer: L.Trainer) -> str:
    """Where a Trainer ran, e.g. ``cpu``, ``1 x cuda (NVIDIA H100 80GB HBM3)``, ``2 x cpu, ddp_spawn``."""
    device = trainer.strategy.root_device
    name = device.type
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    n = trainer.num_devices * trainer.num_nodes
    strategy = type(trainer.strategy).__name__.replace("Strategy", "").lower()
    text = name if n == 1 else f"{n} x {name}"
    return (
        text if strategy in ("singledevice", "") else f"{text}, {getattr(trainer.strategy, 'strategy_name', strategy)}"
    )
