"""Every file the pipeline writes goes through here: into a temporary file beside the target, renamed into
place only when complete (``os.replace``), the temporary file removed when the write fails. A failed write
raises ``OSError`` with the target as ``filename`` and the cause's errno (``ENOSPC`` for a full disk), which
:func:`~.errors.describe_failure` turns into one line naming the path and the free space.

``torch.save`` hides the cause: its zip writer swallows the file object's ``OSError`` and then fails with
``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos``; :func:`save_torch` writes through
a Python file object and raises the ``OSError`` it hit instead.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from excitation_pullbacks.saving import write_atomic

__all__ = ["save_torch", "write_bytes", "write_file", "write_text"]


def write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, sync: bool = False) -> Path:
    """Write ``path`` atomically (the core's :func:`~excitation_pullbacks.saving.write_atomic`): nothing is
    left at ``path`` or beside it when ``write`` fails; an OSError (also one that torch wrapped in a
    RuntimeError) is raised as ``OSError(errno, strerror, path)``, and a failure of torch's zip writer whose
    cause it hid as ``OSError(EIO)``. Returns ``path``."""
    try:
        return write_atomic(path, write, sync=sync)
    except RuntimeError as err:
        if "inline_container" in str(err):  # torch's writer, cause unknown
            raise OSError(errno.EIO, f"torch.save failed ({str(err).splitlines()[0][:120]})", str(path)) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`write_file`)."""
    return write_file(path, lambda f: f.write(data), sync=sync)


def write_text(path: str | os.PathLike, text: str, *, sync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_file`)."""
    return write_bytes(path, text.encode("utf-8"), sync=sync)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`write_file`)."""
    return write_file(path, lambda f: torch.save(obj, f))
