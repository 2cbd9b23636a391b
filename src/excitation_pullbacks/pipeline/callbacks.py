"""Hydra callbacks: after a multirun, one metric table for all its evaluate jobs (models x settings)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["MergeTables", "merge_tables"]


def merge_tables(sweep_dir: str | os.PathLike) -> Path | None:
    """Concatenate ``<job>/results/metrics_table.csv`` of every job under ``sweep_dir`` into
    ``sweep_dir/metrics_table.csv`` with a leading ``job`` column (the job's folder). Returns its path, or
    None when no job wrote a table (e.g. a figures multirun)."""
    root = Path(sweep_dir)
    tables = sorted(root.glob("*/results/metrics_table.csv"))
    if not tables:
        return None
    rows, header = [], ["job"]
    for path in tables:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                header += [k for k in row if k not in header]
                rows.append({"job": path.parent.parent.name, **row})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out = root / "metrics_table.csv"
    tmp = root / ".metrics_table.csv.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out)
    return out


class MergeTables(Callback):
    """Writes the merged table of :func:`merge_tables` in the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        out = merge_tables(config.hydra.sweep.dir)
        if out is not None:
            print(f"merged metric table: {out}")
