"""Stopping long computations on request: the core's loops (ascent steps, pullback chunks, metric curves)
call :func:`check_stop` with the caller's ``should_stop`` callable, so that a program can end them between
steps (the pipeline passes one that reads its SIGINT/SIGTERM flag) without the core knowing why."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ShouldStop", "Stopped", "check_stop"]

#: A callable with no arguments returning True when the computation should end (None: never).
ShouldStop = Callable[[], bool] | None


class Stopped(BaseException):
    """A computation ended early because its ``should_stop`` returned True. A BaseException (as
    KeyboardInterrupt) so that ``except Exception`` handlers on the way up do not swallow it."""


def check_stop(should_stop: ShouldStop) -> None:
    """Raise :class:`Stopped` when ``should_stop`` is given and returns True; cheap enough for every step."""
    if should_stop is not None and should_stop():
        raise Stopped("stopped on request")
