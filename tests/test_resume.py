"""Resumable training: a train run stopped by a signal saves its state and the same command resumes from it,
with checkpoints bit for bit those of an uninterrupted run (one process in-process; the real CLI, also under
2-process CPU DDP, in subprocesses)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from excitation_pullbacks.pipeline.checkpoints import CheckpointSteps
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.stopping import Stopped

from helpers import CLI, compose_config, read_rows

#: 64 digits in batches of 16: 4 steps per epoch, 12 steps; checkpoints before, at and after the stops.
TRAIN = [
    "experiment=train_digits",
    "logger=csv",
    "train.subset=64",
    "train.batch_size=16",
    "train.epochs=3",
    "train.checkpoint_steps=[0,4,5,6,8,9,12]",
]


def _checkpoints(results: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = results / "checkpoints"
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("step_*.pt"))}


def assert_same_training(a: Path, b: Path) -> None:
    """The two results folders hold the same checkpoints (torch.equal on every tensor), the same checkpoint
    table and the same step log."""
    ca, cb = _checkpoints(a), _checkpoints(b)
    assert ca.keys() == cb.keys() and len(ca) >= 7
    for name in ca:
        assert ca[name].keys() == cb[name].keys()
        assert all(torch.equal(ca[name][k], cb[name][k]) for k in ca[name]), name
    assert (a / "checkpoints.csv").read_text() == (b / "checkpoints.csv").read_text()
    assert read_rows(a / "csv_train" / "metrics.csv") == read_rows(b / "csv_train" / "metrics.csv")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return run(compose_config(*TRAIN, f"output_dir={tmp_path_factory.mktemp('whole')}"))["results"]


@pytest.mark.parametrize(
    "step, sig",
    [(5, signal.SIGUSR1), (8, signal.SIGTERM), (12, signal.SIGINT)],
    ids=["mid-epoch", "epoch-end", "last-step"],
)
def test_a_stopped_run_resumes_to_the_same_checkpoints(tmp_path, monkeypatch, uninterrupted, step, sig):
    """A real signal, sent to this process right after optimizer step ``step`` (mid-epoch, the last batch of
    an epoch, the last step), stops the run with its state saved; running the same config again resumes."""
    save = CheckpointSteps.on_train_batch_end

    def signal_after(self, trainer, module, *args):
        save(self, trainer, module, *args)
        if trainer.global_step == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(CheckpointSteps, "on_train_batch_end", signal_after)
    cfg = compose_config(*TRAIN, f"output_dir={tmp_path}")
    with pytest.raises(Stopped, match=rf"stopped by {sig.name}.* resumes from step {step}$"):
        run(cfg)
    state = json.loads((tmp_path / ".results.partial" / "resume" / "state.json").read_text())
    assert state["step"] == step and not (tmp_path / "results").exists()
    monkeypatch.setattr(CheckpointSteps, "on_train_batch_end", save)
    results = run(cfg)["results"]
    assert not (results / "resume").exists() and not (tmp_path / ".results.partial").exists()
    assert_same_training(results, uninterrupted)


def test_a_signal_outside_resume_signals_stops_without_a_state(tmp_path, monkeypatch):
    save = CheckpointSteps.on_train_batch_end

    def signal_after(self, trainer, module, *args):
        save(self, trainer, module, *args)
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(CheckpointSteps, "on_train_batch_end", signal_after)
    cfg = compose_config(*TRAIN, "train.resume_signals=[SIGUSR1]", f"output_dir={tmp_path}")
    with pytest.raises(Stopped, match="staging folder is removed"):
        run(cfg)
    assert not (tmp_path / ".results.partial").exists()


def test_a_state_of_another_config_is_not_resumed(tmp_path, monkeypatch):
    """The state is tied to the config hash; resume_signals is not part of it."""
    save = CheckpointSteps.on_train_batch_end

    def signal_after(self, trainer, module, *args):
        save(self, trainer, module, *args)
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(CheckpointSteps, "on_train_batch_end", signal_after)
    with pytest.raises(Stopped, match="resumes from step 3$"):
        run(compose_config(*TRAIN, "train.epochs=1", f"output_dir={tmp_path}"))
    monkeypatch.setattr(CheckpointSteps, "on_train_batch_end", save)
    other = compose_config(
        *TRAIN, "train.epochs=1", "train.lr=0.001", "train.resume_signals=[SIGTERM]", f"output_dir={tmp_path}"
    )
    out = run(other)["results"]
    log = read_rows(out / "csv_train" / "metrics.csv")
    assert min(int(r["step"]) for r in log if r.get("train/loss")) == 0  # started anew


def test_bad_resume_signals_is_one_error(tmp_path):
    from excitation_pullbacks.pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="train.resume_signals: 'SIGNOPE' is not a signal"):
        run(compose_config(*TRAIN, "train.resume_signals=[SIGNOPE]", f"output_dir={tmp_path}"))


def _cli_until(
    args: list[str], out: Path, step: int, sig: int = signal.SIGTERM, file_limit: int | None = None
) -> subprocess.CompletedProcess:
    """Run the CLI (its files limited to ``file_limit`` bytes each, RLIMIT_FSIZE, when given), send ``sig`` to
    it once checkpoint ``step`` is in the staging folder, wait for it (at most 300 s: a run that does not end
    by then is killed with its processes and the test fails)."""
    index = out / ".results.partial" / "checkpoints" / "index.json"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    if file_limit is not None:  # before any rank is started; its processes inherit it
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (file_limit, file_limit))
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if any(r["step"] >= step for r in json.loads(index.read_text())):
                proc.send_signal(sig)
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run did not end within 300 s of the signal")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow  # three CLI runs, about a minute on 2 cores
@pytest.mark.parametrize("ddp", [False, True], ids=["one-process", "ddp-2-cpu"])
def test_the_cli_exits_with_the_resume_line_and_resumes(tmp_path, ddp):
    """SIGTERM to the CLI (under trainer=ddp: to the launcher, rank 0, only): exit status 143 and one line
    ending "resumes from step N"; the same command again resumes and gives the uninterrupted run's
    checkpoints (on 1 and on 2 processes alike: the global batches are the same)."""
    ddp_args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"] if ddp else []
    # slow steps (a large held-out evaluation at every checkpoint) so that the signal lands mid-run
    args = [*TRAIN, "train.epochs=4", "train.checkpoint_steps=[0,1,2,3,4,5,6,7,8,9,10,11,12]", *ddp_args]
    whole = subprocess.run(
        [*CLI, *args, f"output_dir={tmp_path / 'whole'}"], capture_output=True, text=True, check=False
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "stopped"
    first = _cli_until([*args, f"output_dir={out}"], out, step=3)
    lines = [x for x in first.stderr.splitlines() if x.startswith("error:")]
    assert first.returncode == 143, first.stderr[-3000:]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], first.stderr[-3000:]
    stopped_at = int(lines[0].rsplit("resumes from step ", 1)[1])
    assert 3 <= stopped_at < 16 and "Traceback" not in first.stderr
    again = subprocess.run([*CLI, *args, f"output_dir={out}"], capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {stopped_at}" in again.stdout
    ca, cb = _checkpoints(out / "results"), _checkpoints(tmp_path / "whole" / "results")
    assert ca.keys() == cb.keys()
    assert all(torch.equal(ca[n][k], cb[n][k]) for n in ca for k in ca[n])


@pytest.mark.slow  # two 2-process CLI runs' worth, about a minute on 2 cores
def test_a_failed_state_write_under_ddp_ends_every_rank_with_one_line(tmp_path):
    """Under 2-process DDP, rank 0's write of the resumable state fails (a file-size limit: EFBIG, as a full
    disk fails a write). The ranks agree after each stage of the save, so the other rank does not wait in a
    barrier until the process group's timeout (30 minutes): the run ends at once, non-zero, with one line
    naming the failure, and publishes nothing."""
    args = [
        *TRAIN,
        "train.epochs=4",
        "train.checkpoint_steps=[0,1,2,3,4,5,6,7,8,9,10,11,12]",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    ]
    out = tmp_path / "run"
    started = time.monotonic()
    # files up to 300 KB: a checkpoint (about 140 KB) passes, the state with the optimizer's moments does not
    done = _cli_until([*args, f"output_dir={out}"], out, step=3, file_limit=300_000)
    lines = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(lines) == 1 and "the file is larger than this process may write" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and time.monotonic() - started < 240
    assert not (out / "results").exists()
