"""A predict run's results as they are made: one shard file per batch of rows, so that an interrupted run
resumes with only the missing batches and the merged results equal an uninterrupted run's.

The rows (images) of a predict run are cut into chunks of ``batch_size`` consecutive rows: chunk c holds rows
``c * batch_size`` up to ``(c + 1) * batch_size`` (the last one may be shorter). Each chunk is one predict
batch (:class:`~.batches.RowChunks`), and its results are one shard in ``<staging>/shards/``::

    run.json                 {"config_hash", "chunks", "rows", "batch_size"}: whose shards these are
    c<chunk>.r<rank>.pt      one chunk's results (``torch.save`` of {key: (n, ...) tensor}), written atomically
    index.r<rank>.jsonl      one line per shard rank r wrote: {"chunk", "file", "size", "sha256"}; appended
                             (and synced) after the shard file is complete

A shard is trusted only when its index line is complete, the file is there and its size and sha256 match;
anything else is computed again. Per-image keys a task needs only for its first rows (the images and maps
its figures draw, :attr:`~.tasks.base.Plan.keep_first`) are cut to those rows before a shard is written, so
the shards and their merge hold the per-image scalars, not every image.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .atomic import save_torch, write_text
from .manifest import file_digest

__all__ = ["FOLDER", "ShardStore", "chunk_count"]

FOLDER = "shards"
RUN = "run.json"


def chunk_count(rows: int, batch_size: int) -> int:
    """The number of chunks (predict batches) of ``rows`` rows, ``batch_size`` rows each (the last shorter)."""
    return -(-int(rows) // int(batch_size))


class ShardStore:
    """The shards of one run in ``staging/shards`` (see the module). config_hash: the run's config hash (the
    shards of another config are never used)."""

    def __init__(self, staging: str | os.PathLike, config_hash: str):
        self.folder = Path(staging) / FOLDER
        self.config_hash = str(config_hash)

    def _expected(self, rows: int, batch_size: int) -> dict:
        return {
            "config_hash": self.config_hash,
            "chunks": chunk_count(rows, batch_size),
            "rows": int(rows),
            "batch_size": int(batch_size),
        }

    def _run(self) -> dict | None:
        try:
            data = json.loads((self.folder / RUN).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def open(self, rows: int, batch_size: int) -> None:
        """The launcher, before the run: keep the shards of this config and these rows, drop any others and
        every shard file whose checksum does not match its index line (it is computed again)."""
        expected = self._expected(rows, batch_size)
        if self._run() != expected:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / RUN).is_file():
            write_text(self.folder / RUN, json.dumps(expected, indent=1) + "\n")
        good = {p.name for p in self.saved().values()}
        for path in self.folder.glob("c*.pt"):
            if path.name not in good:
                path.unlink(missing_ok=True)

    def write(self, chunk: int, rank: int, results: Mapping[str, Tensor], keep_first: Mapping[str, int]) -> Path:
        """Save one chunk's results (rows ascending) as rank ``rank``'s shard and record it in its index.
        keep_first: {key: n} - keep ``results[key]`` only for rows < n."""
        rows = results["row"]
        # a copy: a view would save the whole storage it is cut from
        shard = {k: (v[rows < keep_first[k]] if k in keep_first else v.clone()) for k, v in results.items()}
        path = save_torch(shard, self.folder / f"c{int(chunk):06d}.r{int(rank)}.pt")
        line = json.dumps({"chunk": int(chunk), "file": path.name, **file_digest(path)}) + "\n"
        with open(self.folder / f"index.r{int(rank)}.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return path

    def saved(self) -> dict[int, Path]:
        """{chunk: shard file} of every shard this config's run saved whose file matches its index line."""
        run = self._run()
        if run is None or run.get("config_hash") != self.config_hash:
            return {}
        out: dict[int, Path] = {}
        for index in sorted(self.folder.glob("index.r*.jsonl")):
            try:
                lines = index.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            for text in lines:
                try:
                    entry = json.loads(text)
                    chunk, path = int(entry["chunk"]), self.folder / str(entry["file"])
                    want = {"size": int(entry["size"]), "sha256": str(entry["sha256"])}
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption
                if chunk in out or not 0 <= chunk < int(run["chunks"]) or path.parent != self.folder:
                    continue
                if path.is_file() and path.stat().st_size == want["size"] and file_digest(path) == want:
                    out[chunk] = path
        return out

    def missing(self, chunks: int) -> list[int]:
        """The chunks of ``0 .. chunks - 1`` that have no trusted shard."""
        done = self.saved()
        return [c for c in range(int(chunks)) if c not in done]

    def merge(self, chunks: int) -> dict[str, Tensor]:
        """Every chunk's shard, concatenated in row order, one shard in memory at a time -> {key: (N, ...)}.
        Raises RuntimeError naming a chunk that has no trusted shard."""
        done = self.saved()
        parts: dict[str, list[Tensor]] = {}
        for c in range(int(chunks)):
            if c not in done:
                raise RuntimeError(f"the results of batch {c} are missing from {self.folder}")
            shard = torch.load(done[c], weights_only=True)
            for k, v in shard.items():
                parts.setdefault(k, []).append(v)
            del shard
        return {k: torch.cat(v) for k, v in parts.items()}

    def count(self) -> tuple[int, int]:
        """(trusted shards, chunks of the run) as saved now; (0, 0) without a run record."""
        run = self._run()
        if run is None or run.get("config_hash") != self.config_hash:
            return 0, 0
        return len(self.saved()), int(run["chunks"])

    def discard(self) -> None:
        """Remove the shards (the merged results were written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
