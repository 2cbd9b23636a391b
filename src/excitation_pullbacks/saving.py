"""Saving torch files atomically: into a temporary file beside the target, renamed into place only when
complete, the temporary file removed when the save fails - a failed save leaves neither a half-written target
nor a stray temporary file, and an older file at the target stays as it was."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["save_atomic", "write_atomic"]


def _os_cause(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s cause / context chain (``err`` itself included)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, sync: bool = False) -> Path:
    """Write ``path`` atomically (see the module): ``write(f)`` fills a binary file object of a temporary file
    in the same folder, which then replaces ``path`` (``sync``: fsync it first).

    Raises what ``write`` raised; an OSError (also one torch's zip writer wrapped in a RuntimeError, e.g. a full
    disk) as ``OSError(errno, strerror, path)`` naming the target. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
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


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`write_atomic`); the folder is created when missing.
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: torch.save(obj, f))
