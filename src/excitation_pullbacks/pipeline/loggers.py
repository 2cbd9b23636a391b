"""The run's CSV logger (hyperparameters and summary, in the staging folder so that it moves with the
results) and a training run's step loggers (CSV and the job's W&B run, :mod:`.dashboard`)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from .dashboard import Dashboard

__all__ = ["fit_loggers", "log_csv"]


def fit_loggers(csv: bool, staging: Path, dashboard: Dashboard | None) -> list:
    """The loggers of a training run's steps: CSV in ``staging/csv_train`` (when ``csv``), the job's W&B run."""
    loggers: list = []
    if csv:
        loggers.append(CSVLogger(str(staging), name="csv_train", version=""))
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
