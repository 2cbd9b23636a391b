"""The Hydra callback of ``experiment=ablations``: when the multirun ends, the paired-difference table of every
setting against the default (:mod:`.tables.ablations`) in ``<sweep dir>/ablations.csv`` and ``ablations.md``,
printed, and logged as the ``ablations`` table of one W&B run (job type ``ablations``) in the jobs' group."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .atomic import write_text
from .dashboard import Dashboard, wandb_enabled
from .errors import PipelineError
from .outputs import write_csv
from .tables.ablations import ablation_rows, markdown, read_jobs
from .tables.paired import as_table
from .terminal import say

__all__ = ["AblationTable", "write_ablation_table"]


def write_ablation_table(sweep_dir: str | os.PathLike) -> tuple[Path, list[dict]]:
    """Read the finished jobs under ``sweep_dir``, write ``ablations.csv`` and ``ablations.md`` there; returns
    (the CSV's path, its rows). Raises PipelineError (no default job, jobs that cannot be paired)."""
    root = Path(sweep_dir)
    rows = ablation_rows(read_jobs(root))
    write_csv(root / "ablations.csv", rows)
    write_text(root / "ablations.md", markdown(rows))
    return root / "ablations.csv", rows


def _log_to_wandb(config: DictConfig, sweep_dir: Path, rows: list[dict]) -> Path | None:
    try:
        cfg = {k: OmegaConf.to_container(config[k], resolve=True) for k in ("logger",)}
        cfg["name"] = str(config.name)
    except OmegaConfBaseException:
        return None
    if not wandb_enabled(cfg):
        return None
    dashboard = Dashboard.start(
        cfg["logger"],
        sweep_dir,
        name=f"{cfg['name']}/ablations",
        group=cfg["logger"].get("group") or cfg["name"],
        job_type="ablations",
        tags=["ablations"],
        notes="one-at-a-time ablations: per-image paired differences of each setting against the default",
        outcome="the table's files are written; its W&B run is incomplete",
    )
    dashboard.log_tables({"ablations": as_table(rows)})
    folder = dashboard.folder
    dashboard.finish()
    dashboard.check_written()
    return folder


class AblationTable(Callback):
    """When the multirun ends: the ablation table from the jobs' results (whatever order they ran in; jobs that
    failed are left out). Hydra calls the end callbacks in reverse order, so this runs before the overview of
    :class:`~.callbacks.MergeTables`; a table that cannot be made, or its W&B run cut short, is one ``error:`` line on
    stderr."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path, rows = write_ablation_table(sweep_dir)
        except PipelineError as err:
            print(f"error: no ablation table: {err}", file=sys.stderr)  # the jobs' overview still follows
            return
        say(f"ablation table: {path} and {path.with_suffix('.md')}")
        for line in markdown(rows).splitlines():
            say(line)
        try:
            folder = _log_to_wandb(config, sweep_dir, rows)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)  # as above: the overview follows
            return
        if folder is not None:
            say(f"W&B ablation table: {folder} (upload with: wandb sync {folder})")
