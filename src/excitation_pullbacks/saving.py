"""Saving torch files atomically: into a temporary file beside the target, renamed into place only when
complete, the temporary file removed when the save fails - a failed save leaves neither a half-written target
nor a stray temporary file, and an older file at the target stays as it was."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic"]


def _os_cause(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s cause / context chain (``err`` itself included)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see the module); the folder is created when missing.

    Raises what ``torch.save`` raised; an OSError (also one torch's zip writer wrapped in a RuntimeError, e.g. a
    full disk) as ``OSError(errno, strerror, path)`` naming the target. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _os_cause(err)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise
    return path
