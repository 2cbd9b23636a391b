"""Which local checkpoints the explorer's page may load: the files of one folder the operator names at start
(``pullbacks-app --checkpoint-dir DIR``) and the checkpoint the explorer started with. Any other value is
refused with one message that does not tell whether the path exists, and the page shows checkpoints by their
name in the folder, never by a server path outside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .models import ModelError

__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointRefused", "Checkpoints"]

#: File name endings of the checkpoints a folder offers.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
MAX_LISTED = 200


class CheckpointRefused(ModelError):
    """A page value that names no checkpoint this explorer offers (outside its folder, missing, not a file)."""


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints the page offers.

    root: the operator's folder, resolved (None: the page offers none). start: the server path of the
    checkpoint the explorer started with (None: none), offered by its file name.
    """

    root: Path | None = None
    start: str | None = None

    @classmethod
    def offered(cls, folder: str | os.PathLike | None = None, start: str | None = None) -> Checkpoints:
        """The files of ``folder`` (ModelError when it is no folder) and the start checkpoint ``start``."""
        root = None
        if folder is not None:
            root = Path(os.path.expanduser(str(folder))).resolve()
            if not root.is_dir():
                raise ModelError(f"--checkpoint-dir {folder} is not a folder")
        return cls(root, str(start) if start else None)

    def choices(self) -> list[str]:
        """The names the page lists: the start checkpoint's, then the folder's files relative to it (sorted)."""
        names = [self.shown(self.start)] if self.start else []
        if self.root is not None:
            files = sorted(
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.suffix.lower() in CHECKPOINT_SUFFIXES and self._inside(p)
            )
            names += [f for f in files[:MAX_LISTED] if f not in names]
        return names

    def shown(self, path: str | None) -> str:
        """The name the page and its command lines give a server path: relative to the folder when inside it,
        else its file name only ("" for None)."""
        if not path:
            return ""
        p = Path(os.path.expanduser(path)).resolve()
        if self.root is not None and p.is_relative_to(self.root):
            return p.relative_to(self.root).as_posix()
        return p.name

    def public(self, path: str | None) -> str | None:
        """The path a command line may show: inside the folder, the file's path there; else its file name."""
        if not path:
            return None
        p = Path(os.path.expanduser(path)).resolve()
        return str(p) if self.root is not None and p.is_relative_to(self.root) else p.name

    def resolve(self, value: str | None) -> str | None:
        """The server path of a page value (blank: None). Raises CheckpointRefused, with the same message
        whether the path is outside the folder, missing or no file, for any value the page does not offer."""
        text = str(value).strip() if value is not None else ""
        if not text:
            return None
        if self.start and text == self.shown(self.start):
            return self.start
        if self.root is not None and not Path(text).is_absolute():
            p = self.root / text
            if p.suffix.lower() in CHECKPOINT_SUFFIXES and self._inside(p) and p.is_file():
                return str(p.resolve())
        raise CheckpointRefused(
            f"checkpoint {text!r} is not offered by this explorer: pick one from the list (the files of the "
            "folder named with pullbacks-app --checkpoint-dir)"
        )

    def _inside(self, path: Path) -> bool:
        """Whether ``path``, links resolved, lies in the folder."""
        return self.root is not None and path.resolve().is_relative_to(self.root)
