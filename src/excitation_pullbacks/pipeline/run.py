"""``run(cfg)``: the one run skeleton every task goes through (the CLI's body; tests call it directly).

validate -> the results folder for this config (:mod:`.manifest`: skip it when complete, refuse or go beside
one of another config) -> staging folder and the job's W&B run (:mod:`.dashboard`, opened before the work)
-> SIGINT/SIGTERM handling (:mod:`.signals`) -> the task's plan (model, data, per-batch module) ->
``Trainer.predict`` (or ``fit``) on ``cfg.trainer``'s devices -> rank 0: merge the ranks' shards, the task's
files, figures, config.yaml -> the launcher: timing.json, results logged to W&B (its run file read back
whole), publish to ``results`` with the manifest written last -> the report. Nothing is published unless the
run completed; a failed or stopped run removes its staging folder and finishes its W&B run as failed.
"""

from __future__ import annotations

import json
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from excitation_pullbacks.stopping import Stopped

from .atomic import write_file, write_text
from .batches import RowChunks
from .dashboard import Dashboard
from .errors import PipelineError
from .fitting import Resume, fit
from .loggers import log_csv
from .manifest import Verdict, config_hash, examine, identity
from .outputs import (
    RESULTS,
    check_directory,
    discard_staging,
    is_launcher,
    output_dir,
    prepare_staging,
    publish,
    run_name,
    staging_for,
    wandb_dir,
    write_timing,
)
from .resume import read_state
from .shards import FOLDER as SHARDS
from .shards import ShardStore, chunk_count
from .signals import StopCallback, check_stop, exit_code, handling_signals, received
from .tasks import TASKS
from .tasks.base import Plan, RunContext, Task
from .terminal import describe_device, progress_callbacks, say
from .timing import StepTimer
from .writer import ResultWriter

__all__ = [
    "ON_CONFLICT",
    "check_accelerator",
    "report",
    "report_lines",
    "resolve",
    "results_folder",
    "run",
]

#: Rank 0 -> launcher: what the task's finalize leaves for the W&B run (removed before publication).
PAYLOAD = ".outputs.json"

#: What a run does when its output dir holds complete results of another config.
ON_CONFLICT = ("error", "beside")


def resolve(cfg: DictConfig) -> dict:
    """The composed config as a plain dict with interpolations resolved and enums as their names."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)


@dataclass
class Finish:
    """Rank 0, after the merge: the task's files, figures, the CSV log, what the launcher logs to W&B
    (:data:`PAYLOAD`), then config.yaml (the mark that rank 0 finished). Picklable (ddp_spawn)."""

    task: Task
    resolved: dict
    final: Path

    def __call__(self, merged: dict) -> None:
        staging = staging_for(self.final)
        outputs = self.task.finalize(merged, staging)
        for key, (im, _) in outputs.figures.items():
            write_file(staging / f"{key}.png", lambda f, im=im: im.save(f, format="PNG"))
        check_stop()
        log_csv(self.resolved, staging, outputs.summary)
        payload = {
            "figures": {key: caption for key, (_, caption) in outputs.figures.items()},
            "table": outputs.table,
            "summary": outputs.summary,
            "by_temperature": outputs.by_temperature,
            "tables": outputs.tables,
        }
        write_text(staging / PAYLOAD, json.dumps(payload))
        write_text(staging / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(self.resolved)))


def predict(
    cfg: DictConfig, plan: Plan, finish: Finish, store: ShardStore, out: Path, timer: StepTimer, launcher: bool
) -> tuple[str, dict]:
    """``Trainer.predict`` of ``plan.module`` over (image, label, dataset index, row) batches of
    ``cfg.batch_size`` consecutive rows on ``cfg.trainer``'s devices, only the batches ``store`` holds no
    shard of; each batch is saved as a shard as it is made and rank 0 merges them into ``finish``
    (:class:`~.writer.ResultWriter`); ``timer`` adds up the predict steps' time. Returns the device it ran on
    (:func:`describe_device`) and {"batches", "reused", "computed"}: the run's batches, those a stopped run
    had saved, and those computed now."""
    progress, bar = progress_callbacks()
    data = plan.data
    if data is None:
        data = TensorDataset(plan.images, plan.labels, plan.index, torch.arange(len(plan.images)))
    size, n = int(cfg.batch_size), len(data)
    chunks = chunk_count(n, size)
    if launcher:
        store.open(n, size)
    todo = store.missing(chunks)
    writer = ResultWriter(store, chunks, size, finish, plan.keep_first)
    try:
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            num_nodes=int(cfg.trainer.num_nodes),
            strategy=cfg.trainer.strategy,
            inference_mode=False,
            logger=False,
            callbacks=[timer, StopCallback(), writer, *progress],
            enable_progress_bar=bar,
            enable_model_summary=False,
            default_root_dir=str(out),
            use_distributed_sampler=False,  # RowChunks splits the batches among the ranks
        )
    except (MisconfigurationException, RuntimeError, ValueError) as err:
        raise PipelineError(f"trainer settings {dict(cfg.trainer)} cannot be used here: {err}") from None
    if launcher and len(todo) < chunks:
        print(
            f"resuming: {chunks - len(todo)} of {chunks} batches are saved in {store.folder}; computing the other {len(todo)}"
        )
    if todo:
        loader = DataLoader(data, batch_sampler=RowChunks(n, size, todo))
        with warnings.catch_warnings():  # RowChunks yields every row of its chunks: nothing is dropped
            warnings.filterwarnings("ignore", message="You are using a custom batch sampler")
            trainer.predict(plan.module, dataloaders=loader, return_predictions=False)
    elif launcher:  # every batch was saved by a stopped run: merge them
        writer.merge()
    return describe_device(trainer), {"batches": chunks, "reused": chunks - len(todo), "computed": len(todo)}


def task_for(cfg: DictConfig) -> Task:
    """A fresh instance of the task ``cfg.task`` names."""
    name = cfg.get("task", "figures")
    if name not in TASKS:
        raise PipelineError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


def check_accelerator(trainer_cfg) -> None:
    """Raise PipelineError when ``trainer.accelerator`` / ``trainer.devices`` ask for GPUs this machine lacks,
    saying what is there and which ``trainer=`` to use."""
    acc = str(trainer_cfg.accelerator).lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = f"{gpus} CUDA GPU(s) and the CPU" if gpus else "the CPU only (torch sees no CUDA GPU)"
    if acc in ("gpu", "cuda") and gpus == 0:
        raise PipelineError(
            f"trainer.accelerator={acc} needs a CUDA GPU, but this machine has {available}: use trainer=cpu"
        )
    if acc == "mps" and not (torch.backends.mps.is_available()):
        raise PipelineError(f"trainer.accelerator=mps is not available here ({available}): use trainer=cpu")
    devices = trainer_cfg.devices
    if acc in ("gpu", "cuda") and isinstance(devices, int) and devices > gpus:
        raise PipelineError(
            f"trainer.devices={devices} asks for more GPUs than the {gpus} available: use trainer.devices={gpus} "
            f"or trainer=cpu"
        )


def results_folder(cfg: DictConfig, out: Path, ident: dict) -> tuple[Path, Verdict]:
    """The results folder this config writes to and what it holds now: ``out/results``, or with
    ``on_conflict=beside`` and results of another config there, ``out/results-<hash8>``. Raises
    PipelineError naming the differing keys for a conflict under ``on_conflict=error``."""
    final = out / RESULTS
    verdict = examine(final, ident)
    if verdict.state != "conflict":
        return final, verdict
    shown = "; ".join(verdict.differences[:4]) + ("; ..." if len(verdict.differences) > 4 else "")
    if cfg.get("on_conflict", "error") == "beside":
        beside = out / f"{RESULTS}-{config_hash(ident)[:8]}"
        again = examine(beside, ident)
        if again.state == "conflict":
            raise PipelineError(f"{beside} holds results of yet another config ({shown}): choose another output_dir")
        if is_launcher():
            print(f"{final} holds results of another config ({shown}): writing beside it in {beside}")
        return beside, again
    raise PipelineError(
        f"{final} holds results of another config ({shown}); choose another output_dir, or on_conflict=beside "
        f"to write beside them"
    )


def run(cfg: DictConfig) -> dict:
    """Run one job. Returns {"results": dir (None in DDP children), "wandb": offline run dir or None,
    "skipped": bool, "timing": dict, "kept": the user's files left in the results folder} and the task's own
    entries (evaluate: "objective").

    Raises PipelineError (or ValueError/OSError from the core and torchvision) for bad input, and
    :class:`~excitation_pullbacks.stopping.Stopped` when SIGINT/SIGTERM stopped it (nothing published).
    """
    started, wall = time.perf_counter(), time.time()
    task = task_for(cfg)
    resolved = resolve(cfg)
    if int(cfg.batch_size) < 1:
        raise PipelineError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.get("on_conflict", "error") not in ON_CONFLICT:
        raise PipelineError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, got {cfg.on_conflict!r}")
    task.validate(cfg)
    out = output_dir(cfg)
    check_directory(out)
    ident = identity(resolved)
    final, verdict = results_folder(cfg, out, ident)
    launcher = is_launcher()
    if verdict.state == "complete" and cfg.skip_complete:
        print(f"skipping complete run: {final}")
        return {"results": final, "wandb": wandb_dir(final), "skipped": True, **task.result(final)}
    if launcher and verdict.state == "incomplete" and verdict.detail:
        print(f"{final} is incomplete ({verdict.detail}): running it again")
    check_accelerator(cfg.trainer)
    resume_signals = task.resume_signals(cfg)
    chash = config_hash(ident)
    with handling_signals(resume_signals):
        state = read_state(staging_for(final), chash) if resume_signals else None
        shards = ShardStore(staging_for(final), chash)
        keep = True if state is not None else SHARDS if shards.count()[0] else False
        staging = prepare_staging(final, launcher, keep=keep)
        if launcher and state is not None:
            print(f"resuming from step {state.step}: {state.folder}")
        batches = None
        dashboard = Dashboard.open(resolved, out, run_name(cfg)) if launcher else None
        try:
            torch.manual_seed(int(cfg.seed))  # random weights (weights=null) are the same on every rank and run
            plan = task.plan(RunContext(cfg, resolved, out, staging, launcher))
            check_stop()
            finish = Finish(task, resolved, final)
            timer = StepTimer()
            if plan.fit is None:
                device, batches = predict(cfg, plan, finish, shards, out, timer, launcher)
            else:  # a training task
                device = fit(cfg, plan, finish, staging, dashboard, timer, Resume(chash, resume_signals, state))
            if not launcher:  # a DDP child: rank 0 (the launcher) publishes and reports
                return {"results": None, "wandb": None, "skipped": False}
            check_stop()
            if not (staging / "config.yaml").is_file() or not (staging / PAYLOAD).is_file():
                raise PipelineError(f"the run finished without writing its results into {staging}")
            payload = json.loads((staging / PAYLOAD).read_text())
            (staging / PAYLOAD).unlink()
            timing = write_timing(staging, time.perf_counter() - started, timer.seconds, timer.parts)
            if dashboard is not None:
                dashboard.log_results(
                    payload["figures"],
                    staging,
                    payload["table"],
                    payload["summary"],
                    payload["by_temperature"],
                    payload["tables"],
                )
                dashboard.log_timing(timing, device)
                dashboard.write_pointer(staging)
                check_stop()
                dashboard.finish()
                dashboard.check_written()  # W&B goes on when its writes fail: publish only a whole dashboard
            kept = publish(staging, final, ident, wall)
        except Stopped as err:
            what = signal.Signals(received()).name if received() else f"a stop request ({err})"
            saved = read_state(staging, chash) if resume_signals else None
            done, chunks = shards.count()
            if launcher:
                if saved is None and not done:
                    discard_staging(final)
                if dashboard is not None:
                    dashboard.finish(exit_code(), stopped_by=what)
            if saved is not None:
                raise Stopped(
                    f"stopped by {what}: nothing was published to {final}; the training state is saved in "
                    f"{saved.folder}; run the same command again and it resumes from step {saved.step}"
                ) from None
            if done:
                raise Stopped(
                    f"stopped by {what}: nothing was published to {final}; the results of {done} of {chunks} batches "
                    f"are saved in {shards.folder}; run the same command again and it computes only the other "
                    f"{chunks - done}"
                ) from None
            raise Stopped(
                f"stopped by {what}: nothing was published to {final} (its staging folder is removed); run the same "
                f"command again to start this run again"
            ) from None
        except BaseException as err:
            if launcher:
                discard_staging(final)
                if dashboard is not None:
                    dashboard.fail(err)
            raise
    if kept:
        shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
        print(f"kept {len(kept)} file(s) in {final} that this tool did not write: {shown}")
    return {
        "results": final,
        "wandb": None if dashboard is None else dashboard.folder,
        "skipped": False,
        "timing": timing,
        "device": device,
        "kept": kept,
        "batches": batches,
        **task.result(final),
    }


def report_lines(result: dict) -> list[str]:
    """The end-of-run report: where the results are, the device, the time split, the objective, and how to
    sync the offline W&B run."""
    lines = [f"results: {result['results']}"]
    if result.get("device"):
        lines.append(f"device: {result['device']}")
    timing = result.get("timing") or {}
    if timing.get("model_passes_s") is not None:
        parts = [f"{k} {timing[k + '_s']:.1f} s" for k in ("steps", "validation", "held_out") if timing.get(k + "_s")]
        split = f" ({', '.join(parts)})" if len(parts) > 1 else ""
        lines.append(
            f"time: {timing['total_s']:.1f} s, model passes {timing['model_passes_s']:.1f} s{split}, everything else "
            f"{timing['other_s']:.1f} s ({100 * timing['other_fraction']:.1f}%)"
        )
    elif timing.get("total_s") is not None:
        lines.append(f"time: {timing['total_s']:.1f} s")
    if result.get("objective") is not None:
        lines.append(f"objective: {result['objective']:.6g}")
    if result.get("wandb"):
        lines.append(f"W&B run: {result['wandb']} (upload with: wandb sync {result['wandb']})")
    return lines


def report(result: dict, stream=None) -> None:
    """Print the report of :func:`report_lines`; to stdout, it also goes to the job's log file."""
    for line in report_lines(result):
        if stream is None:
            say(line)
        else:
            print(line, file=stream)
