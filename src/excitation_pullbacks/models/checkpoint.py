"""Reading and writing model state dicts: one loader with one clear error per way a checkpoint can be wrong."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..saving import save_atomic

__all__ = ["load_checkpoint", "save_state_dict"]


def _examples(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (strictly: every key, every shape) and return the model.

    path: a ``torch.save`` file of a state dict, or of a dict holding one under ``state_dict`` (Lightning's
    layout). Read with ``weights_only=True``: tensors and plain containers only, never arbitrary objects.
    Raises FileNotFoundError for a missing file, ValueError for a file that is not a readable state dict
    (corrupt, truncated, a pickled object) or one made for another architecture (missing, unexpected or
    differently shaped parameters).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower() or "global" in str(err).split("\n")[0].lower():
            raise ValueError(
                f"checkpoint {path} holds Python objects besides tensors (e.g. a whole pickled model); "
                "save and load model.state_dict() instead"
            ) from None
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as err:
        raise ValueError(
            f"checkpoint {path} is corrupt, truncated or not a torch file ({type(err).__name__})"
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict (a mapping of parameter names to tensors)")
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        sizes = ", ".join(
            f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in shapes[:3]
        )
        parts = [
            f"{len(missing)} missing ({_examples(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else "",
            f"{len(shapes)} of another shape ({sizes}{', ...' if len(shapes) > 3 else ''})" if shapes else "",
        ]
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__} (another architecture or "
            f"configuration?): parameters " + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state)
    return model


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` atomically (:func:`~excitation_pullbacks.saving.save_atomic`: a
    failed write leaves nothing behind and an older file as it was)."""
    return save_atomic(model.state_dict(), path)
