"""The run's CSV logger (hyperparameters and summary, in the staging folder so that it moves with the
results) and a training run's step loggers (CSV and the job's W&B run, :mod:`.dashboard`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from .atomic import write_text
from .dashboard import Dashboard

__all__ = ["CSV_TRAIN", "continued_csv", "fit_loggers", "log_csv"]

#: The training steps' CSV log folder in the staging folder.
CSV_TRAIN = "csv_train"


def fit_loggers(csv: bool, staging: Path, dashboard: Dashboard | None) -> list:
    """The loggers of a training run's steps: CSV in ``staging/csv_train`` (when ``csv``), the job's W&B run."""
    loggers: list = []
    if csv:
        loggers.append(CSVLogger(str(staging), name=CSV_TRAIN, version=""))
    if dashboard is not None:
        loggers.append(dashboard.fit_logger())
    return loggers


def log_csv(cfg: dict, staging: Path, summary: dict) -> None:
    """``staging/csv``: the resolved config as hyperparameters and the summary scalars (when ``logger.csv``)."""
    if not cfg["logger"]["csv"]:
        return
    csv_logger = CSVLogger(str(staging), name="csv", version="")
    csv_logger.log_hyperparams(cfg)
    csv_logger.log_metrics(summary)
    csv_logger.save()


def _read(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@contextmanager
def continued_csv(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Keep the rows of ``folder/metrics.csv`` across a resumed training run: Lightning's CSV logger starts
    the file anew, so the earlier rows are taken out on entry and put back in front of the new ones on exit
    (also when the run stops again), under the union of the columns in Lightning's (sorted) order."""
    path = folder / "metrics.csv"
    header, earlier = _read(path) if enabled else ([], [])
    if enabled:
        path.unlink(missing_ok=True)
    try:
        yield
    finally:
        if earlier:
            new_header, rows = _read(path)
            columns = sorted(set(header) | set(new_header))
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\r\n")
            writer.writeheader()
            writer.writerows(earlier + rows)
            folder.mkdir(parents=True, exist_ok=True)
            write_text(path, out.getvalue())
