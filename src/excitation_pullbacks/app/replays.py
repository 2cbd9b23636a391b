"""The explorer's pullbacks: per gate a :class:`~excitation_pullbacks.replay.ReplayedPullback` of the model in
use, so that a gate the page keeps using (the excitation and vanilla panels, the ascent's steps) runs as a
replayed graph - bit for bit ``pullback``'s result, without the engine's per-call work - once it has been used
``WARMUP`` times at an image size. One model at a time: a model the page switched away from is let go.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

from torch import Tensor, nn

from excitation_pullbacks import GateOptions, Neuron
from excitation_pullbacks.replay import ReplayedPullback

__all__ = ["WARMUP", "explorer_pullback", "replay_of"]

#: Calls of a gate at an image size before it is traced: about two explorations (a trace costs about 50 eager
#: calls of the digits CNN; a gate used once, e.g. a temperature the strip shows, is never traced).
WARMUP = 20
#: Gates kept per model (least recently used dropped first).
KEEP = 16

_lock = threading.Lock()
_model: weakref.ref | None = None
_replays: OrderedDict[GateOptions, ReplayedPullback] = OrderedDict()


def replay_of(model: nn.Module, gate: GateOptions) -> ReplayedPullback:
    """The page's replayed pullback of ``model`` under ``gate`` (made on first use)."""
    global _model
    with _lock:
        if _model is None or _model() is not model:
            _replays.clear()
            _model = weakref.ref(model)
        replay = _replays.pop(gate, None) or ReplayedPullback(model, gate, warmup=WARMUP)
        _replays[gate] = replay
        while len(_replays) > KEEP:
            _replays.popitem(last=False)
        return replay


def explorer_pullback(model: nn.Module, x: Tensor, target: int | Tensor | Neuron, gate: GateOptions) -> Tensor:
    """``pullback(model, x, target, gate)``: x (N, 3, H, W) -> (N, 3, H, W)."""
    return replay_of(model, gate)(x, target)
