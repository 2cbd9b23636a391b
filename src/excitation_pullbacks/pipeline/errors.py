"""The one exception type the pipeline raises for bad input, and the one-line messages for the failures a
run can meet on the way (out of memory, a full or read-only disk); the CLI prints them as single lines."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

__all__ = ["OtherRankFailed", "PipelineError", "cannot_write", "describe_failure", "free_space"]


class PipelineError(Exception):
    """Bad input to the pipeline (unknown class, unreadable data, unwritable output, ...)."""


class OtherRankFailed(PipelineError):
    """Raised on the processes of a multi-process run whose own step went well when another's failed: that
    one reports its error; of these only the launcher says a line."""


DISK = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_failure(err: BaseException, batch_size: int | None = None, where: str = "") -> str | None:
    """A one-line message for a failure that is not bad input but the machine's (memory, disk), else None.

    batch_size: the run's ``batch_size`` (named in out-of-memory advice); where: the output dir.
    """
    lower = f"lower batch_size (now {batch_size})" if batch_size else "lower batch_size"
    advice = f"{lower}, baselines.batch_size or the evaluate batch sizes"
    if isinstance(err, torch.OutOfMemoryError):
        return f"out of memory on the GPU ({_first_line(err)[:160]}); {advice}"
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err).lower()):
        return f"out of memory on the CPU ({_first_line(err)[:160]}); {advice}"
    if isinstance(err, OSError) and err.errno in DISK:
        return cannot_write(err.filename or where, DISK[err.errno])
    return None


def cannot_write(
    path,
    reason: str,
    outcome: str = "nothing was published",
    advice: str = "free space or choose another output_dir",
) -> str:
    """The one-line message for a file the run could not write: the path, why, the free space there, what to do
    (``advice``) and ``outcome`` (what became of the results)."""
    return f"cannot write {path}: {reason} ({free_space(path)}); {advice} ({outcome})"


def free_space(path) -> str:
    """``"<n> free on that disk"`` for the file system holding ``path`` (its nearest existing folder)."""
    p = Path(os.path.abspath(os.fspath(path or ".")))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free on that disk" if unit == "B" else f"{free:.1f} {unit} free on that disk"
        free /= 1024
    return ""
