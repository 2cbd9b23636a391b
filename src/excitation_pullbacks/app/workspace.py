"""The explorer's work folder on the server: each run's input image, its panels and each export in a folder of
its own, with only the newest ``keep`` folders of each kind kept, so that disk use stays bounded however many
requests come (Gradio's own cache of uploads and results is bounded by ``delete_cache``, see :func:`.page.build_demo`).
"""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

__all__ = ["Workspace"]


class Workspace:
    """Folders ``root/<kind>/<random name>``; creating one removes the oldest of its kind beyond ``keep``."""

    def __init__(self, root: str | Path, keep: int = 64):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root, self.keep = Path(root), int(keep)
        self._lock = threading.Lock()
        self._made: dict[str, list[Path]] = {}

    def new(self, kind: str) -> Path:
        """A new empty folder ``root/kind/<name>``; the oldest folders of ``kind`` beyond ``keep`` are removed."""
        folder = self.root / kind / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        with self._lock:
            made = self._made.setdefault(kind, [])
            made.append(folder)
            old, made[:] = made[: -self.keep], made[-self.keep :]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

    def count(self, kind: str) -> int:
        """How many folders of ``kind`` are on disk."""
        where = self.root / kind
        return sum(1 for p in where.iterdir() if p.is_dir()) if where.is_dir() else 0
