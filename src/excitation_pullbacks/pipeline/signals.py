"""SIGINT and SIGTERM (and a training run's resume signals, e.g. SIGUSR1) during a run: stop within seconds,
cleanly.

:func:`handling_signals` installs the run's own handler (restoring the previous ones afterwards). The first
signal only sets a flag; the run checks it between batches (:class:`StopCallback`; a training run's
:class:`~.resume.ResumeCallback`) and inside the core's long loops (the ``should_stop`` argument of
``pullback``, ``ascent`` and the metrics gets :func:`stop_requested`), and raises
:class:`~excitation_pullbacks.stopping.Stopped`, a BaseException that Lightning re-raises. A second signal
raises at once. The run then removes its staging folder (a training run keeps it with its resumable state)
and the CLI exits with 128 + the signal number (130, 143, 138).

``Trainer.fit`` installs Lightning's own SIGTERM handler, which turns SIGTERM into ``SystemExit(None)``
(exit status 0, no message); :func:`take_over` puts the run's handler back for the training steps.
A handler that was there before the run (a cluster launcher's, e.g. submitit's requeue on SIGUSR1) gets the
signal after the run has stopped: :func:`pass_on`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from lightning.pytorch.callbacks import Callback

from excitation_pullbacks.stopping import Stopped

__all__ = [
    "SIGNALS",
    "StopCallback",
    "check_stop",
    "exit_code",
    "handling_signals",
    "parse_signals",
    "pass_on",
    "received",
    "stop_requested",
    "take_over",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"signal": None, "handled": (), "previous": {}}
_flag = threading.Event()


def parse_signals(names: Iterable) -> tuple[signal.Signals, ...]:
    """Signal names (``SIGTERM``, ``TERM``, any case) or numbers -> signals; ValueError naming a bad one.
    SIGKILL and SIGSTOP cannot be caught."""
    out = []
    for name in names:
        try:
            sig = signal.Signals(int(name)) if str(name).lstrip("-").isdigit() else None
            if sig is None:
                text = str(name).upper()
                sig = signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
        except (KeyError, ValueError):
            raise ValueError(f"{name!r} is not a signal (e.g. SIGTERM, SIGINT, SIGUSR1)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{sig.name} cannot be caught")
        if sig not in out:
            out.append(sig)
    return tuple(out)


def stop_requested() -> bool:
    """True once a handled signal arrived during the run (the ``should_stop`` the core's loops get)."""
    return _flag.is_set()


def received() -> int | None:
    """The signal that stopped the last run (None: none)."""
    return _state["signal"]


def exit_code() -> int:
    """128 + the signal number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1); 1 without a signal."""
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


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handling_signals(extra: Iterable[int] = ()) -> Iterator[None]:
    """Install the stop handler for SIGINT, SIGTERM and the ``extra`` signals for the block (main thread only;
    elsewhere a no-op) and restore the previous handlers after it. The flag is cleared on entry."""
    _flag.clear()
    _state["signal"] = None
    if not _main_thread():
        yield
        return
    handled = tuple(dict.fromkeys([*SIGNALS, *(signal.Signals(s) for s in extra)]))
    previous = {s: signal.getsignal(s) for s in handled}
    _state["handled"], _state["previous"] = handled, previous
    for s in handled:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state["handled"] = ()


def take_over() -> None:
    """Put the run's handler back for every signal it handles (after Lightning installed its own; Lightning
    restores the run's handler when the Trainer tears down). Main thread only; elsewhere a no-op."""
    if _main_thread():
        for s in _state["handled"]:
            signal.signal(s, _handler)


def pass_on() -> None:
    """Call the Python handler that was installed before the run for the signal that stopped it, if any (a
    cluster launcher's: submitit requeues the job on SIGUSR1 and exits). Call it after the run has stopped and
    said so; the default actions (terminate) are not taken: the CLI exits with :func:`exit_code` instead."""
    sig = _state["signal"]
    handler = _state["previous"].get(sig) if sig else None
    if callable(handler) and handler not in (_handler, signal.default_int_handler):
        handler(sig, None)


class StopCallback(Callback):
    """Checks the stop flag before every predict batch and at the end of the epoch (before rank 0 writes)."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        check_stop()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        check_stop()
