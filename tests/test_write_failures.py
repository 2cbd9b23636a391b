"""Every write failure is one ``error:`` line naming the path and the free space, and leaves nothing
half-written.

No full file system can be made here without root, so a full disk is simulated: the file objects the
pipeline's writer (``pipeline.atomic``, through the core's ``saving.write_atomic``) opens raise
``OSError(ENOSPC)`` once a byte limit is passed, exactly as ``write(2)`` fails on a full disk; ``torch.save``'s real zip writer writes through them. A real kernel write
failure comes from the file size limit (``RLIMIT_FSIZE``, ``EFBIG``) of a CLI subprocess, or of W&B's service
process alone.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from excitation_pullbacks import saving
from excitation_pullbacks.pipeline import atomic
from excitation_pullbacks.pipeline.cli import main
from excitation_pullbacks.pipeline.dashboard import Dashboard, run_records
from excitation_pullbacks.pipeline.errors import PipelineError, describe_failure

from helpers import (
    CLI,
    assert_nothing_written,
    assert_one_error_line,
    cli_in_process,
    read_wandb_run,
    tiny_overrides,
)


class FullDisk(io.RawIOBase):
    """A binary file that takes ``limit`` bytes, then fails every write with ENOSPC."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.written + len(b) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(b)
        return self.f.write(b)

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """Files whose name contains one of the given names fill the disk after ``limit`` bytes."""

    def make(names: tuple[str, ...], limit: int = 100):
        real_open = open

        def fake_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return FullDisk(f, limit) if "w" in mode and any(n in str(path) for n in names) else f

        monkeypatch.setattr(saving, "open", fake_open, raising=False)

    return make


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, full_disk):
    target = tmp_path / "tensors.pt"
    target.write_bytes(b"old")
    full_disk(("tensors.pt",))
    with pytest.raises(OSError) as info:
        atomic.save_torch({"x": torch.randn(1000)}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["tensors.pt"]
    line = describe_failure(info.value)
    assert line.startswith(f"cannot write {target}: no space left on the device (") and "free on that disk" in line


def test_torch_zip_writer_errors_become_the_os_error_they_hide(tmp_path):
    """torch.save swallows the file's OSError and raises 'enforce fail ... unexpected pos'; the writer raises
    the OSError."""

    def fill(f):
        torch.save({"x": torch.randn(10000)}, FullDisk(f, 5000))

    with pytest.raises(OSError) as info:
        atomic.write_file(tmp_path / "a.pt", fill)
    assert info.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tensors.pt", ["figures=[fig2]", "ascent=none"]),
        ("metrics_table.csv", ["figures=[fig2]", "ascent=none"]),
        ("manifest.json", ["figures=[fig2]", "ascent=none"]),
        ("step_000002.pt", ["experiment=train_digits", "train.subset=32", "train.batch_size=16", "train.epochs=2"]),
    ],
)
def test_a_full_disk_is_one_error_line_and_nothing_is_published(
    tmp_path, monkeypatch, capsys, full_disk, name, overrides
):
    full_disk((name,))
    if overrides[0].startswith("experiment="):  # not the tiny figures run: the console entry point as it is
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["pullbacks", *overrides, "logger=csv", "output_dir=out"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        code, err = exit_info.value.code, capsys.readouterr().err
    else:
        code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, "output_dir=out", *overrides)
    assert_one_error_line(code, err, f"cannot write {tmp_path}/out/", name, "no space left", "free on that disk")
    assert "Traceback" not in err
    left = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file() and "wandb" not in p.parts]
    assert not (tmp_path / "out" / "results").exists() or name == "manifest.json"
    assert not [n for n in left if n.endswith(".tmp")], left
    if name == "manifest.json":  # the last write: results/ holds no manifest, so the next run redoes it
        assert not (tmp_path / "out" / "results" / "manifest.json").exists()


def _fsize_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # a CLI subprocess
def test_a_real_write_failure_in_torch_save_is_one_line(tmp_path):
    """The kernel refuses to grow a file past 64 KiB (RLIMIT_FSIZE): the first is the predictions' shard, which
    torch.save writes."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=src)
    args = tiny_overrides("figures=[fig2]", "logger=none", f"output_dir={tmp_path / 'out'}")
    res = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=_fsize_limit(64 * 1024),
        timeout=300,
        check=False,
    )
    assert_one_error_line(
        res.returncode, res.stderr, "shards/c000000.r0.pt", "larger than this process may write", "free on"
    )
    assert "Traceback" not in res.stderr and not (tmp_path / "out" / "results").exists()
    assert not (tmp_path / "out" / ".results.partial").exists()
    assert sys.platform.startswith("linux")


# ---------------------------------------------------------------------------------------------------------------
# W&B's writer: its service (wandb-core, a process of its own) writes the run file and goes on when a write fails


def test_a_run_file_that_ends_early_fails_the_check(tmp_path):
    dashboard = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path, name="n")
    dashboard.log_tables({"t": [["a"], [1]]})
    dashboard.finish()
    dashboard.check_written()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert read_wandb_run(path.parent).exit_code == 0  # the service has closed the file
    whole = path.read_bytes()
    for size in (len(whole) - 3, len(whole) // 2):
        path.write_bytes(whole[:size])
        with pytest.raises(ValueError):
            run_records(path)
        with pytest.raises(PipelineError) as info:
            dashboard.check_written(wait_s=0.1)
        line = str(info.value)
        assert line.startswith(f"cannot write {path}: W&B's writer") and "free on that disk" in line


def test_w_and_bs_media_writes_name_the_run_folder(tmp_path):
    """W&B's own media and table writes fail with an OSError naming no file."""

    class Run:
        dir = str(tmp_path / "offline-run-x" / "files")

        def log(self, *args, **kwargs):
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    with pytest.raises(OSError) as info:
        Dashboard(Run()).log_tables({"t": [["a"], [1]]})
    line = describe_failure(info.value, where="elsewhere")
    assert line.startswith(f"cannot write {tmp_path / 'offline-run-x'}: the file is larger than this process may")


def _child_named(parent: int, name: str) -> int | None:
    """The pid of a child process of ``parent`` called ``name``, if one runs (a killed one not yet waited for, a
    zombie, does not)."""
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        running = "State:\tZ" not in status
        if f"Name:\t{name}\n" in status and f"PPid:\t{parent}\n" in status and running:
            return int(entry.name)
    return None


#: A short figures run of the digits CNN.
FIGURES = ["experiment=digits", "figures=[fig2]", "ascent=none", "targets.rows=[0,1]", "temperatures=[0.3]"]


def _start_cli(tmp_path: Path, args: list[str], out: Path, silent: bool) -> subprocess.Popen:
    """The CLI with ``args``, W&B offline, results in ``out``, in a session of its own (a test that fails kills its
    group) and with a W&B service of its own (not the one an earlier test started in this process)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=src)
    env.pop("WANDB_SERVICE", None)
    env.pop("WANDB_SILENT", None)
    if silent:
        env["WANDB_SILENT"] = "true"
    return subprocess.Popen(
        [*CLI, *args, "logger=wandb", f"output_dir={out}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow  # a CLI subprocess
def test_a_real_write_failure_of_w_and_bs_run_file_is_one_line(tmp_path):
    """W&B's service cannot grow a file past 4 KiB (RLIMIT_FSIZE, set on it once it runs; it catches SIGXFSZ, so
    its writes fail with EFBIG): it logs the failure, goes on and leaves its run file cut short while the run's
    own files are written. The run ends with one line naming the run file, exit 1, and publishes nothing."""
    out = tmp_path / "out"
    proc = _start_cli(tmp_path, FIGURES, out, silent=True)
    try:
        deadline, core = time.monotonic() + 120, None
        while core is None and proc.poll() is None and time.monotonic() < deadline:
            core = _child_named(proc.pid, "wandb-core")
            time.sleep(0.01)
        assert core is not None, "W&B's service did not start"
        resource.prlimit(core, resource.RLIMIT_FSIZE, (4096, 4096))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert proc.returncode == 1
    assert_one_error_line(
        proc.returncode, stderr, f"cannot write {run_file}: W&B's writer", "free on that disk", "nothing was published"
    )
    assert "Traceback" not in stderr and "W&B run:" not in stdout
    assert run_file.stat().st_size <= 4096
    assert_nothing_written(out)


@pytest.mark.slow  # starts and ends W&B's service
def test_a_cut_short_multirun_overview_is_one_line(tmp_path, capsys):
    """The multirun's W&B overview, logged in this process once the jobs are done, by a service that cannot
    grow a file past 1 KiB: one line naming its run file and saying the jobs' results stand, exit 1."""
    import wandb
    from omegaconf import OmegaConf

    from excitation_pullbacks.pipeline.callbacks import MergeTables, clear_jobs

    warm = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "warm", name="warm")  # the service runs
    warm.finish()
    warm.check_written()
    core = _child_named(os.getpid(), "wandb-core")
    assert core is not None, "W&B's service is not a child of this process"
    resource.prlimit(core, resource.RLIMIT_FSIZE, (1024, 1024))
    sweep = tmp_path / "sweep"
    config = OmegaConf.create(
        {
            "name": "n",
            "logger": {"wandb": True, "mode": "offline", "project": "p"},
            "hydra": {"sweep": {"dir": str(sweep)}},
        }
    )
    clear_jobs()
    try:
        with pytest.raises(SystemExit) as info:
            MergeTables().on_multirun_end(config)
    finally:
        wandb.teardown()  # the limited service ends; the next run starts another
    (run_file,) = sweep.glob("wandb/offline-run-*/run-*.wandb")
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert_one_error_line(
        1, err, f"cannot write {run_file}: W&B's writer", "the jobs' results are published; the overview's W&B run"
    )


def _warm_service(tmp_path: Path) -> int:
    """The pid of W&B's service for this process's runs, a child of this process (started here when none runs)."""
    warm = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "warm", name="warm")
    warm.finish()
    warm.check_written()
    core = _child_named(os.getpid(), "wandb-core")
    assert core is not None, "W&B's service is not a child of this process"
    return core


def _exit_records(path: Path) -> list:
    """The exit records of a run file; none when it ends early."""
    try:
        return [r.exit for r in run_records(path) if r.WhichOneof("record_type") == "exit"]
    except ValueError:
        return []


@pytest.mark.slow  # kills W&B's service; the next run starts another
def test_a_killed_w_and_b_service_is_one_error_and_the_next_run_starts_another(tmp_path):
    """Every call into W&B fails once its service is killed: one PipelineError naming the run file, said again
    by later calls; finishing the failed run is quiet, and the next run gets a new service."""
    core = _warm_service(tmp_path)
    dashboard = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "a", name="a")
    dashboard.log_tables({"t": [["a"], [1]]})
    os.kill(core, signal.SIGKILL)
    with pytest.raises(PipelineError) as info:
        dashboard.log_tables({"u": [["a"], [2]]})
    (run_file,) = (tmp_path / "a").glob("wandb/offline-run-*/run-*.wandb")
    line = str(info.value)
    # the socket's own words: "Connection lost" or "[Errno 104] Connection reset by peer", as the kill lands
    assert line.startswith(f"cannot write {run_file}: W&B's service process ended during the run (")
    assert "found while logging the tables): what it had not yet written there is lost, the run's end among it" in line
    assert line.endswith("; run it again (nothing was published)") and "free on that disk" in line
    dashboard.finish(1)  # the failure path: nothing more to say
    with pytest.raises(PipelineError) as again:
        dashboard.log_timing({"total_s": 1.0}, "cpu")
    assert str(again.value) == line
    assert not _exit_records(run_file)
    after = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "b", name="b")
    after.log_tables({"t": [["a"], [3]]})
    after.finish()
    after.check_written()
    assert read_wandb_run(after.folder).exit_code == 0  # written by a new service


@pytest.mark.slow  # a CLI subprocess
@pytest.mark.parametrize(
    "args",
    [
        FIGURES,
        ["experiment=train_digits", "train.epochs=20"],  # met by Lightning's logger during training
    ],
    ids=["figures", "train"],
)
def test_w_and_bs_service_killed_mid_run_is_one_line_and_nothing_at_exit(tmp_path, args):
    """W&B's service is killed (SIGKILL) once the run's W&B run has started: the run ends with one line naming the
    run file and what was lost, exit 1, no traceback (W&B's exit hook included), and publishes nothing."""
    out = tmp_path / "out"
    proc = _start_cli(tmp_path, args, out, silent=False)  # what W&B prints on its own too
    try:
        deadline, started = time.monotonic() + 120, False
        while not started and proc.poll() is None and time.monotonic() < deadline:
            logs = list(out.glob("wandb/offline-run-*/logs/debug.log"))
            started = bool(logs) and "run started, returning control" in logs[0].read_text(errors="replace")
            time.sleep(0.01)
        core = _child_named(proc.pid, "wandb-core")
        assert started and core is not None, "W&B's run did not start"
        os.kill(core, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert proc.returncode == 1, stderr
    assert_one_error_line(
        proc.returncode,
        stderr,
        f"cannot write {run_file}: W&B's service process ended during the run (",
        "the run's end among it",
        "run it again (nothing was published)",
    )
    assert "Traceback" not in stderr and "W&B run:" not in stdout
    assert not _exit_records(run_file)
    assert_nothing_written(out)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow  # limits W&B's service
def test_a_failed_check_ends_only_its_own_run_which_is_finished_as_failed(tmp_path):
    """Two runs open in this process on one service that cannot grow a file past 16 KiB: the first, whose file
    outgrows that, fails the check and is finished as failed (exit code 1; its file, which takes no record after a
    failed write, cannot hold it); the second still logs, finishes and reads back whole with its exit record."""
    core = _warm_service(tmp_path)
    soft, hard = resource.prlimit(core, resource.RLIMIT_FSIZE)
    resource.prlimit(core, resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        big = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "big", name="big")
        other = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "other", name="other")
        big.summarize({f"blob{i}": "x" * 1000 for i in range(100)})  # in the run file itself, past the limit
        other.log_tables({"t": [["a"], [1]]})
        log = big.folder / "logs" / "debug-internal.log"
        deadline = time.monotonic() + 30
        while "writer: failed to save record" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        big.finish()
        with pytest.raises(PipelineError) as info:
            big.check_written(wait_s=0.5)
        (big_file,) = big.folder.glob("run-*.wandb")
        assert str(info.value).startswith(f"cannot write {big_file}: W&B's writer failed: the file is larger than")
        assert not _exit_records(big_file)
        assert "got exitcode: 1" in (big.folder / "logs" / "debug.log").read_text()
        other.log_tables({"after": [["a"], [2]]})
        other.finish()
        other.check_written()
    finally:
        resource.prlimit(core, resource.RLIMIT_FSIZE, (soft, hard))
    rec = read_wandb_run(other.folder)
    assert rec.exit_code == 0 and rec.table("after") == (["a"], [[2]])


@pytest.mark.slow  # kills W&B's service between two runs, in a process of its own
def test_a_run_after_w_and_bs_service_died_between_runs_starts_a_new_one(tmp_path):
    """W&B's service dies while no run uses it (between the jobs of a multirun in one process): the next run's
    start meets the closed connection, lets go of it and starts a new service; nothing is printed at exit."""
    code = f"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_write_failures import _child_named
from excitation_pullbacks.pipeline.dashboard import Dashboard
from helpers import read_wandb_run
log, out = {{"project": "p", "mode": "offline"}}, Path({str(tmp_path)!r})
first = Dashboard.start(log, out / "a", name="a")
first.finish()
first.check_written()
core = _child_named(os.getpid(), "wandb-core")
os.kill(core, signal.SIGKILL)
time.sleep(0.5)
after = Dashboard.start(log, out / "b", name="b")
after.log_tables({{"t": [["a"], [3]]}})
after.finish()
after.check_written()
print(read_wandb_run(after.folder).exit_code, _child_named(os.getpid(), "wandb-core") not in (None, core))
"""
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("WANDB_SERVICE", None)  # a service of its own, a child of the script
    env.pop("WANDB_SILENT", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.slow  # kills W&B's service
def test_a_run_failing_of_something_else_keeps_its_own_error_when_w_and_b_is_gone_too(tmp_path):
    """W&B's service is gone when a run fails: finishing it as failed says nothing more when the run failed of
    something else (that error stands), and says the one W&B line when the lost connection is the cause."""
    core = _warm_service(tmp_path)
    other = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "other", name="other")
    lost = Dashboard.start({"project": "p", "mode": "offline"}, tmp_path / "lost", name="lost")
    os.kill(core, signal.SIGKILL)
    time.sleep(0.5)
    other.fail(MemoryError("out of memory"))  # quiet: the run's own error is what to say
    with pytest.raises(PipelineError, match="W&B's service process ended during the run"):
        lost.fail(ConnectionResetError("Connection lost"))
