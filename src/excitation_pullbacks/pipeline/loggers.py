"""The run's loggers: a CSV logger (hyperparameters, summary) and W&B (figures, table, summary; offline by
default), both written inside the staging folder so that they move with the results."""

from __future__ import annotations

import warnings
from pathlib import Path

import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from excitation_pullbacks.stopping import Stopped

from .signals import exit_code

__all__ = ["fit_loggers", "log_results"]


def _wandb_logger(cfg: dict, staging: Path, run_name: str) -> WandbLogger:
    log = cfg["logger"]
    # silent: W&B would print the staging path; the CLI reports the final one
    return WandbLogger(
        project=log["project"],
        name=run_name,
        group=log.get("group") or cfg["name"],
        save_dir=str(staging),
        offline=log["mode"] == "offline",
        config=cfg,
        settings=wandb.Settings(silent=True),
    )


def fit_loggers(cfg: dict, staging: Path, run_name: str) -> list:
    """The loggers of a training run's steps: CSV in ``staging/csv_train`` and W&B; the W&B run stays open so
    that :func:`log_results` adds the run's figures and summary to the same run."""
    log = cfg["logger"]
    loggers: list = []
    if log["csv"]:
        loggers.append(CSVLogger(str(staging), name="csv_train", version=""))
    if log["wandb"] and log["mode"] != "disabled":
        loggers.append(_wandb_logger(cfg, staging, run_name))
    return loggers


def log_results(cfg: dict, staging: Path, final: Path, figs: dict, table: list, summary: dict, run_name: str) -> None:
    """Log one finished run. cfg: the resolved config; figs: {key: (PIL image, caption)}; table: header row,
    then rows ("" for missing values); summary: {metric: number}. The W&B run's final path (under ``final``,
    the results folder) goes to ``staging / wandb_run.txt``. A W&B run interrupted by an error or a stop is
    finished with a non-zero exit code (failed), never as a successful run."""
    log = cfg["logger"]
    if log["csv"]:
        csv_logger = CSVLogger(str(staging), name="csv", version="")
        csv_logger.log_hyperparams(cfg)
        csv_logger.log_metrics(summary)
        csv_logger.save()
    if not log["wandb"] or log["mode"] == "disabled":
        return
    logger = _wandb_logger(cfg, staging, run_name)
    with warnings.catch_warnings():  # a training run's W&B run, still open, is reused on purpose
        warnings.filterwarnings("ignore", message="There is a wandb run already in progress")
        run_dir = Path(logger.experiment.dir).parent
    try:
        for key, (im, caption) in figs.items():
            logger.log_image(key=f"figures/{key}", images=[im], caption=[caption])
        logger.log_table(key="metrics", columns=table[0], data=[[None if v == "" else v for v in r] for r in table[1:]])
        logger.log_metrics(summary)
    except Stopped:
        logger.experiment.finish(exit_code=exit_code())
        raise
    except BaseException:
        logger.experiment.finish(exit_code=1)
        raise
    logger.experiment.finish()
    (staging / "wandb_run.txt").write_text(str(final / run_dir.relative_to(staging)) + "\n")
