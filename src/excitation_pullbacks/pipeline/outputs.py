"""A run's output directory: where it is, the staging folder results are written to, and the publication
that moves them into ``results``. Layout::

    <output dir>/results/            the finished run (figures, tables, tensors, config.yaml, timing.json, csv/,
                                     wandb/, manifest.json - see :mod:`.manifest`), plus any files of the user's
    <output dir>/.results.partial/   the run in progress; published to results/ when complete
    <output dir>/results-<hash8>/    with on_conflict=beside: a run of another config beside results/
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .atomic import save_torch, write_text
from .errors import PipelineError
from .manifest import listed_files, make_manifest, read_manifest, write_manifest

__all__ = [
    "RESULTS",
    "STAGING",
    "check_directory",
    "discard_staging",
    "is_launcher",
    "output_dir",
    "prepare_staging",
    "publish",
    "run_name",
    "save_tensors",
    "staging_for",
    "wandb_dir",
    "write_csv",
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


def check_directory(path: Path) -> None:
    """Raise PipelineError when ``path`` or a folder above it is an existing file (it cannot be made)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise PipelineError(
                    f"output directory {path} is not writable: {p} is a file, not a folder; choose another output_dir"
                )
            return


def staging_for(final: Path) -> Path:
    """The staging folder of the results folder ``final``: ``.<name>.partial`` beside it."""
    return final.parent / f".{final.name}.partial"


def prepare_staging(final: Path, launcher: bool, keep: bool | str = False) -> Path:
    """Create the output dir and an empty staging folder for ``final`` (the launcher clears an old one, unless
    ``keep``: True keeps all of it - a training run resumes from what it holds; a name keeps that entry only -
    a predict run's saved shards) -> the staging path."""
    out, staging = final.parent, staging_for(final)
    check_directory(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if launcher and staging.exists() and not keep:
            shutil.rmtree(staging)
        elif launcher and staging.is_dir() and isinstance(keep, str):
            for entry in staging.iterdir():
                if entry.name != keep:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        staging.mkdir(exist_ok=True)
        (staging / ".write-test").write_text("")
        (staging / ".write-test").unlink()
    except OSError as err:
        raise PipelineError(f"output directory {out} is not writable: {err.strerror or err}") from None
    return staging


def discard_staging(final: Path) -> None:
    """Remove the staging folder of a failed or interrupted run."""
    shutil.rmtree(staging_for(final), ignore_errors=True)


def _remove_file(folder: Path, name: str) -> None:
    """Remove ``folder/name`` and the folders it leaves empty below ``folder``."""
    path = folder / name
    path.unlink(missing_ok=True)
    for parent in path.parents:
        if parent == folder or folder not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: holds other files
            break


def publish(staging: Path, final: Path, ident: dict, started: float) -> list[str]:
    """Publish the complete ``staging`` folder as ``final`` with its manifest (written last, atomically).

    A new ``final`` is a rename of the staging folder. Into an existing one, only the tool's files are
    replaced: first a manifest marked unfinished listing the old and the new files (so an interruption
    leaves a folder the next run recognises as incomplete and its own), then the old manifest's files are
    removed, the new files moved in, and the complete manifest written. Files no manifest lists are the
    user's and stay; a new file that would overwrite one is a PipelineError. Returns those kept files.
    """
    manifest = make_manifest(staging, ident, started)
    if not final.exists():
        write_manifest(staging, manifest)
        os.replace(staging, final)
        return []
    if not final.is_dir():
        raise PipelineError(f"{final} is a file, not a results folder: move it away")
    old = read_manifest(final)
    ours = set(old["files"]) if old else set()
    present = set(listed_files(final))
    foreign = sorted(present - ours)
    clash = [n for n in manifest["files"] if n in foreign]
    if clash:
        shown = ", ".join(clash[:3]) + (", ..." if len(clash) > 3 else "")
        raise PipelineError(
            f"{final} holds {len(clash)} file(s) no manifest lists (not written by this tool, or by an older "
            f"version) that this run would overwrite: {shown}; move them away and run again"
        )
    write_manifest(final, make_manifest(final, ident, started, complete=False, files=ours | set(manifest["files"])))
    for name in sorted(ours):
        _remove_file(final, name)
    for name in manifest["files"]:
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, final / name)
    write_manifest(final, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    return foreign


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> None:
    """Write dict rows as CSV atomically (a temporary file renamed into place). header: the columns (None: every
    key of the rows, in first-seen order); a row's missing columns are empty."""
    header = list(dict.fromkeys(k for r in rows for k in r)) if header is None else header
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def save_tensors(obj, path: Path) -> None:
    """``torch.save`` atomically; a full disk raises OSError (ENOSPC) naming ``path``, not torch's opaque
    RuntimeError (:func:`~.atomic.save_torch`)."""
    save_torch(obj, path)


def write_timing(folder: Path, total: float, model: float, parts: dict[str, float] | None = None) -> dict:
    """timing.json: wall time of the run split into model passes (predict or training batches, validation
    batches and held-out evaluations in this process, :class:`~.timing.StepTimer`; ``parts`` {part: seconds}
    each written as ``<part>_s``) and everything else (model and data loading, selection, figures, writing,
    logging). Returns the dict."""
    timing = {
        "total_s": round(total, 3),
        "model_passes_s": round(model, 3) if model else None,
        **{f"{k}_s": round(v, 3) for k, v in (parts or {}).items() if v},
        "other_s": round(total - model, 3) if model else None,
        "other_fraction": round((total - model) / total, 4) if model else None,
    }
    write_text(folder / "timing.json", json.dumps(timing, indent=1) + "\n")
    return timing


def wandb_dir(final: Path) -> Path | None:
    """The offline W&B run directory a finished run recorded in ``wandb_run.txt`` (None without W&B)."""
    marker = final / "wandb_run.txt"
    return Path(marker.read_text().strip()) if marker.is_file() else None
