"""The run's loggers: a CSV logger (hyperparameters, summary) and W&B (figures, table, summary; offline by
default), both written inside the staging folder so that they move with the results."""

from __future__ import annotations

from pathlib import Path

import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from excitation_pullbacks.stopping import Stopped

from .signals import exit_code

__all__ = ["log_results"]


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
    # silent: W&B would print the staging path; the CLI reports the final one
    logger = WandbLogger(
        project=log["project"],
        name=run_name,
        group=log.get("group") or cfg["name"],
        save_dir=str(staging),
        offline=log["mode"] == "offline",
        config=cfg,
        settings=wandb.Settings(silent=True),
    )
    try:
        for key, (im, caption) in figs.items():
            logger.log_image(key=f"figures/{key}", images=[im], caption=[caption])
        logger.log_table(key="metrics", columns=table[0], data=[[None if v == "" else v for v in r] for r in table[1:]])
        logger.log_metrics(summary)
        run_dir = Path(logger.experiment.dir).parent
    except Stopped:
        logger.experiment.finish(exit_code=exit_code())
        raise
    except BaseException:
        logger.experiment.finish(exit_code=1)
        raise
    logger.experiment.finish()
    (staging / "wandb_run.txt").write_text(str(final / run_dir.relative_to(staging)) + "\n")
