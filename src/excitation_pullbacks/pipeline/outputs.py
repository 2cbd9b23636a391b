"""A run's output directory: where it is, the staging folder results are written to, and the rename that
publishes them. Layout::

    <output dir>/results/            the finished run (figures, tables, tensors, config.yaml, timing.json, csv/, wandb/)
    <output dir>/.results.partial/   the run in progress; renamed to results/ when complete
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .errors import PipelineError

__all__ = [
    "RESULTS",
    "STAGING",
    "discard_staging",
    "is_launcher",
    "output_dir",
    "prepare_staging",
    "publish_staging",
    "run_name",
    "wandb_dir",
    "write_timing",
]

RESULTS = "results"
STAGING = ".results.partial"


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else Hydra's run (or multirun job) directory."""
    if cfg.get("output_dir"):
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise PipelineError("output_dir would be shared by every multirun job: leave it null (use hydra.sweep.dir)")
        return Path(os.path.expanduser(str(cfg.output_dir))).absolute()
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).absolute()
    raise PipelineError("output_dir is not set: run through the CLI or set output_dir=<dir>")


def is_launcher() -> bool:
    """True in the process that starts the run (not a DDP child started by Lightning or a launcher)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def run_name(cfg: DictConfig) -> str:
    """The run's name for loggers: ``name``, and in a multirun the job's overrides (``name/k=v,...``)."""
    if HydraConfig.initialized():
        overrides = HydraConfig.get().job.override_dirname
        if overrides:
            return f"{cfg.name}/{overrides}"
    return str(cfg.name)


def prepare_staging(out: Path, launcher: bool) -> Path:
    """Create ``out`` and an empty staging folder in it (the launcher clears an old one) -> the staging path."""
    staging = out / STAGING
    try:
        out.mkdir(parents=True, exist_ok=True)
        if launcher and staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(exist_ok=True)
        (staging / ".write-test").write_text("")
        (staging / ".write-test").unlink()
    except OSError as err:
        raise PipelineError(f"output directory {out} is not writable: {err.strerror or err}") from None
    return staging


def discard_staging(out: Path) -> None:
    """Remove the staging folder of a failed or interrupted run."""
    shutil.rmtree(out / STAGING, ignore_errors=True)


def publish_staging(out: Path) -> None:
    """Rename the complete staging folder to ``results`` (replacing an older one)."""
    final = out / RESULTS
    if final.exists():
        shutil.rmtree(final)
    os.replace(out / STAGING, final)


def write_timing(final: Path, total: float, model: float) -> dict:
    """timing.json: wall time of the run split into model passes (predict steps in this process) and
    everything else (model and data loading, selection, figures, writing, logging). Returns the dict."""
    timing = {
        "total_s": round(total, 3),
        "model_passes_s": round(model, 3) if model else None,
        "other_s": round(total - model, 3) if model else None,
        "other_fraction": round((total - model) / total, 4) if model else None,
    }
    tmp = final / ".timing.json.tmp"
    tmp.write_text(json.dumps(timing, indent=1) + "\n")
    os.replace(tmp, final / "timing.json")
    return timing


def wandb_dir(final: Path) -> Path | None:
    """The offline W&B run directory a finished run recorded in ``wandb_run.txt`` (None without W&B)."""
    marker = final / "wandb_run.txt"
    return Path(marker.read_text().strip()) if marker.is_file() else None
