"""SIGINT and SIGTERM during a run: stop within seconds, cleanly.

:func:`handling_signals` installs the run's own handler (restoring the previous ones afterwards). The first
signal only sets a flag; the run checks it between batches (:class:`StopCallback`) and inside the core's long
loops (the ``should_stop`` argument of ``pullback``, ``ascent`` and the metrics gets :func:`stop_requested`),
and raises :class:`~excitation_pullbacks.stopping.Stopped`, a BaseException that Lightning re-raises
(Lightning's own SIGTERM handler, which only logs, is chained after ours). A second signal raises at once.
The run then removes its staging folder and the CLI exits with 128 + the signal number (130, 143).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.callbacks import Callback

from excitation_pullbacks.stopping import Stopped

__all__ = ["SIGNALS", "StopCallback", "check_stop", "exit_code", "handling_signals", "received", "stop_requested"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"signal": None}
_flag = threading.Event()


def stop_requested() -> bool:
    """True once SIGINT or SIGTERM arrived during the run (the ``should_stop`` the core's loops get)."""
    return _flag.is_set()


def received() -> int | None:
    """The signal that stopped the last run (None: none)."""
    return _state["signal"]


def exit_code() -> int:
    """128 + the signal number (130 SIGINT, 143 SIGTERM); 1 without a signal."""
    return 128 + int(_state["signal"]) if _state["signal"] else 1


def check_stop() -> None:
    """Raise Stopped when a stop was requested."""
    if _flag.is_set():
        raise Stopped(f"stopped by {signal.Signals(_state['signal']).name}")


def _handler(signum, frame) -> None:
    first = not _flag.is_set()
    _state["signal"] = signum
    _flag.set()
    if not first:  # a second signal: do not wait for the next check
        raise Stopped(f"stopped by {signal.Signals(signum).name} (second signal)")


@contextmanager
def handling_signals() -> Iterator[None]:
    """Install the stop handler for SIGINT and SIGTERM for the block (main thread only; elsewhere a no-op)
    and restore the previous handlers after it. The flag is cleared on entry."""
    _flag.clear()
    _state["signal"] = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class StopCallback(Callback):
    """Checks the stop flag before every predict batch and at the end of the epoch (before rank 0 writes)."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        check_stop()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        check_stop()
