"""Explain functions that a spawned DDP worker can receive: the core builds them as closures, which pickle
cannot send, so the pipeline hands over the recipe (a module-level factory and its arguments) instead."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["Rebuilt"]


class Rebuilt:
    """``factory(*args, **kwargs)`` (an explain function: (model, x (B, C, H, W), target (B,)) -> map of x's
    shape), built at once (so bad options fail where the run is planned) and again after unpickling.

    factory: a module-level function (pickled by reference); args, kwargs: picklable values.
    """

    def __init__(self, factory: Callable[..., Callable], *args, **kwargs):
        self.factory, self.args, self.kwargs = factory, args, kwargs
        self._explain = factory(*args, **kwargs)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        if self._explain is None:
            self._explain = self.factory(*self.args, **self.kwargs)
        return self._explain(model, x, target)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_explain": None}
