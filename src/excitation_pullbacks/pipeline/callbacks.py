"""Hydra callbacks for a multirun: one overview of its jobs (done / skipped / failed / stopped, time, results,
overrides) printed, in the log and in ``<sweep dir>/jobs.csv``; one metric table of all jobs
(``<sweep dir>/metrics_table.csv``); both logged once to W&B as the sweep's ``multirun`` run in the jobs' group."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .dashboard import Dashboard, wandb_enabled
from .errors import PipelineError
from .outputs import write_csv
from .terminal import say

__all__ = ["JobRecord", "MergeTables", "clear_jobs", "jobs", "merge_tables", "overview_lines", "record_job"]

#: The statuses of a multirun job.
STATUSES = ("done", "skipped", "failed", "stopped")


@dataclass
class JobRecord:
    """One job of a multirun: its number, status (one of STATUSES), wall time, results folder (or the job's
    folder when it failed), overrides, and the error line of a failed or stopped job."""

    num: int
    status: str
    seconds: float
    results: str
    overrides: str
    error: str = ""


_JOBS: list[JobRecord] = []


def record_job(record: JobRecord) -> None:
    """Note one finished job of the multirun running in this process."""
    _JOBS.append(record)


def jobs() -> list[JobRecord]:
    """The jobs noted so far, in order."""
    return list(_JOBS)


def clear_jobs() -> None:
    _JOBS.clear()


def merge_tables(sweep_dir: str | os.PathLike) -> Path | None:
    """Concatenate ``<job>/results/metrics_table.csv`` of every job under ``sweep_dir`` into
    ``sweep_dir/metrics_table.csv`` with a leading ``job`` column (the job's folder). Returns its path, or
    None when no job wrote a table."""
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
    out = root / "metrics_table.csv"
    write_csv(out, rows, header)
    return out


def overview_lines(records: list[JobRecord]) -> list[str]:
    """The jobs as an aligned text table (the full overrides are in jobs.csv), then one line of counts."""
    head = ["#", "status", "time", "results"]
    rows = [[str(r.num), r.status, f"{r.seconds:.1f} s", r.results] for r in records]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    counts = ", ".join(
        f"{sum(r.status == s for r in records)} {s}" for s in STATUSES if any(r.status == s for r in records)
    )
    lines.append(f"{len(records)} job(s): {counts or 'none'}")
    lines += [f"job {r.num} {r.status}: {r.error}" for r in records if r.error]
    return lines


def _log_to_wandb(config: DictConfig, sweep_dir: Path, records: list[JobRecord], table: Path | None) -> Path | None:
    """One W&B run (job type ``multirun``) in the jobs' group holding the overview and the merged table."""
    try:
        cfg = {
            k: OmegaConf.to_container(config[k], resolve=True, enum_to_str=True)
            if OmegaConf.is_config(config[k])
            else config[k]
            for k in ("name", "logger")
        }
    except OmegaConfBaseException:  # an interpolation only a job can resolve: log nothing rather than guess
        return None
    if not wandb_enabled(cfg):
        return None
    dashboard = Dashboard.start(
        cfg["logger"],
        sweep_dir,
        name=f"{cfg['name']}/multirun",
        group=cfg["logger"].get("group") or cfg["name"],
        job_type="multirun",
        tags=["multirun"],
        notes=f"{len(records)} jobs of {cfg['name']}: the overview and the merged metric table",
        outcome="the jobs' results are published; the overview's W&B run is incomplete",
    )
    head = list(asdict(records[0])) if records else ["num"]
    tables = {"jobs": [head] + [list(asdict(r).values()) for r in records]}
    if table is not None:
        with table.open(newline="") as f:
            rows = list(csv.reader(f))

        def cell(v: str):
            try:
                return float(v)
            except ValueError:
                return v

        tables["metrics_table"] = [rows[0]] + [[r[0]] + [cell(v) for v in r[1:]] for r in rows[1:]]
    dashboard.log_tables(tables)
    dashboard.summarize({f"jobs_{s}": sum(r.status == s for r in records) for s in STATUSES})
    folder = dashboard.folder
    dashboard.finish()
    dashboard.check_written()
    return folder


class MergeTables(Callback):
    """When a multirun ends: the merged metric table, the overview of its jobs (printed, in the log,
    ``jobs.csv``), both in one W&B run; exit status 1 when a job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        clear_jobs()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = jobs()
        table = merge_tables(sweep_dir)
        if table is not None:
            say(f"merged metric table: {table}")
        if records:
            write_csv(sweep_dir / "jobs.csv", [asdict(r) for r in records])
            for line in overview_lines(records):
                say(line)
        try:
            folder = _log_to_wandb(config, sweep_dir, records, table)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        if folder is not None:
            say(f"W&B multirun overview: {folder} (upload with: wandb sync {folder})")
        if any(r.status == "failed" for r in records):
            raise SystemExit(1)
