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

__all__ = ["save_torch", "write_bytes", "write_file", "write_text"]


def _cause(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s cause / context chain (``err`` itself included)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, sync: bool = False) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object of a temporary file in the same
    folder, which then replaces ``path`` (``sync``: fsync it first). Nothing is left at ``path`` or beside it
    when ``write`` fails; an OSError (also one that torch wrapped in a RuntimeError) is raised as
    ``OSError(errno, strerror, path)``. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
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
        cause = _cause(err)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        if isinstance(err, RuntimeError) and "inline_container" in str(err):  # torch's writer, cause unknown
            raise OSError(errno.EIO, f"torch.save failed ({str(err).splitlines()[0][:120]})", str(path)) from None
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`write_file`)."""
    return write_file(path, lambda f: f.write(data), sync=sync)


def write_text(path: str | os.PathLike, text: str, *, sync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_file`)."""
    return write_bytes(path, text.encode("utf-8"), sync=sync)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`write_file`)."""
    return write_file(path, lambda f: torch.save(obj, f))
