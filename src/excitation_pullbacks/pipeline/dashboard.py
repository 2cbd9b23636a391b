"""W&B as the run's dashboard (offline by default, no account needed).

The run is opened when the job starts - config, tags, job type and notes up front, so its runtime and system
metrics cover the work and a crash still leaves a run - and finished as what happened: finished, failed
(exit code 1) or stopped (128 + signal, tagged ``stopped``). Results go in as tables with T as a column and
as one record per temperature against a ``temperature`` x axis, so a workspace plots every metric against T.
The offline run lives in ``<output dir>/wandb/`` (beside ``results/``, kept when a run fails).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import wandb
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from .atomic import write_text

__all__ = ["Dashboard", "run_tags", "wandb_enabled"]

#: The x axis of the per-temperature records.
TEMPERATURE = "temperature"


def wandb_enabled(cfg: dict) -> bool:
    """True when the resolved config logs to W&B (``logger.wandb`` and a mode other than disabled)."""
    log = cfg["logger"]
    return bool(log["wandb"]) and log["mode"] != "disabled"


def run_tags(cfg: dict) -> list[str]:
    """The run's tags: task, model, data, gate shape and kind (not for training), then ``logger.tags``."""
    gate, data = cfg.get("gate") or {}, cfg.get("data") or {}
    task = cfg.get("task", "figures")
    tags = [f"task:{task}", f"model:{cfg['model']['name']}", f"data:{data.get('kind', '-')}"]
    if task != "train":  # training runs use no gates
        tags += [f"gate:{gate.get('shape', '-')}", f"gate_kind:{gate.get('kind', '-')}"]
    return tags + [str(t) for t in cfg["logger"].get("tags") or []]


def _notes(cfg: dict) -> str:
    """``logger.notes``, else one sentence saying what the run computes."""
    if cfg["logger"].get("notes"):
        return str(cfg["logger"]["notes"])
    gate, task = cfg.get("gate") or {}, cfg.get("task", "figures")
    what = f"{task} of {cfg['model']['name']} on {(cfg.get('data') or {}).get('kind', '?')}"
    if task == "train":
        return what
    temps = ", ".join(f"{float(t):g}" for t in cfg.get("temperatures") or [])
    return f"{what}; {gate.get('shape', '?')} gates at T = {temps} (main T = {gate.get('temperature', '?')})"


def _cell(v: Any) -> Any:
    """A table cell W&B can type: None for missing values ("" or NaN)."""
    if v == "" or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _table(header: list, rows: list[list]) -> wandb.Table:
    return wandb.Table(columns=[str(h) for h in header], data=[[_cell(v) for v in r] for r in rows])


class Dashboard:
    """One W&B run for one job. Open it with :meth:`open` on the launcher before the work starts."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg: dict, out: Path, name: str) -> Dashboard | None:
        """Start the job's W&B run in ``out/wandb`` (None when the config logs no W&B). cfg: the resolved
        config; name: the run name (in a multirun, the job's overrides)."""
        if not wandb_enabled(cfg):
            return None
        return cls.start(
            cfg["logger"],
            out,
            name=name,
            group=cfg["logger"].get("group") or cfg["name"],
            job_type=str(cfg.get("task", "figures")),
            tags=run_tags(cfg),
            notes=_notes(cfg),
            config=cfg,
        )

    @classmethod
    def start(cls, log: dict, out: Path, **fields) -> Dashboard:
        """A W&B run in ``out/wandb`` under the ``logger`` settings ``log`` (project, mode); fields: name,
        group, job_type, tags, notes, config as ``wandb.init`` takes them."""
        out.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=log["project"],
            dir=str(out),
            mode=log["mode"],
            reinit="create_new",
            settings=wandb.Settings(silent=True),
            **fields,
        )
        return cls(run)

    @property
    def folder(self) -> Path:
        """The run's local folder (``<out>/wandb/offline-run-...`` or ``run-...``): what ``wandb sync`` takes."""
        return Path(self.run.dir).parent

    def fit_logger(self) -> WandbLogger:
        """A Lightning logger writing a training run's steps into this run (also from spawned DDP ranks)."""
        return WandbLogger(experiment=self.run)

    def log_results(
        self,
        figures: dict[str, str],
        folder: Path,
        table: list[list],
        summary: dict,
        by_temperature: list[dict],
        tables: dict[str, list[list]] | None = None,
    ) -> None:
        """Log a finished job's results. figures: {key: caption}, the images read from ``folder/<key>.png``;
        table: header row, then rows (the ``metrics`` table); summary: the run's scalars; by_temperature: one
        record per (method, T); tables: more tables by name (see :class:`~.tasks.base.Outputs`)."""
        run = self.run
        for key, caption in figures.items():
            with Image.open(folder / f"{key}.png") as im:
                run.log({f"figures/{key}": wandb.Image(im.copy(), caption=caption)}, commit=False)
        all_tables = {"metrics": table, **(tables or {})}
        if by_temperature:
            columns = ["method", TEMPERATURE] + sorted(
                {k for r in by_temperature for k in r if k not in ("method", TEMPERATURE)}
            )
            all_tables["by_temperature"] = [columns] + [[r.get(c, "") for c in columns] for r in by_temperature]
        self.log_tables(all_tables)
        self._log_against_temperature(by_temperature)
        if by_temperature and TEMPERATURE not in summary:  # the last T logged is not the run's T
            del run.summary[TEMPERATURE]
        run.summary.update({k: v for k, v in summary.items() if _cell(v) is not None})

    def log_tables(self, tables: dict[str, list[list]]) -> None:
        """Log tables {key: header row, then rows} ("" and NaN as missing values) in one history step."""
        for key, rows in tables.items():
            if rows:
                self.run.log({key: _table(rows[0], rows[1:])}, commit=False)
        self.run.log({}, commit=True)

    def _log_against_temperature(self, records: list[dict]) -> None:
        """One history row per T: ``<method>/<metric>`` against the ``temperature`` x axis."""
        if not records:
            return
        run = self.run
        run.define_metric(TEMPERATURE, hidden=True)
        for method in sorted({r["method"] for r in records}):
            run.define_metric(f"{method}/*", step_metric=TEMPERATURE, summary="none")
        by_t: dict[float, dict] = {}
        for r in records:
            row = by_t.setdefault(float(r[TEMPERATURE]), {TEMPERATURE: float(r[TEMPERATURE])})
            row.update(
                {
                    f"{r['method']}/{k}": v
                    for k, v in r.items()
                    if k not in ("method", TEMPERATURE) and _cell(v) is not None
                }
            )
        for t in sorted(by_t):
            run.log(by_t[t])

    def log_timing(self, timing: dict, device: str) -> None:
        """The run's time split (``timing/*``) and the device it ran on, in the summary."""
        self.run.summary.update({f"timing/{k}": v for k, v in timing.items() if v is not None})
        self.run.summary["device"] = device

    def finish(self, exit_code: int = 0, stopped_by: str | None = None) -> None:
        """Finish the run: 0 finished, else failed; ``stopped_by`` (a signal name) tags it ``stopped``."""
        if stopped_by:
            self.run.tags = (*self.run.tags, "stopped")
            self.run.summary["stopped_by"] = stopped_by
        self.run.finish(exit_code=exit_code)

    def write_pointer(self, staging: Path) -> None:
        """``staging/wandb_run.txt``: the run's folder, for the report and for runs skipped later."""
        write_text(staging / "wandb_run.txt", os.fspath(self.folder) + "\n")
