"""W&B as the dashboard, checked on the records W&B itself wrote (the offline ``.wandb`` files read back): the
run opened before the work and finished as what happened, tags / job type / notes / config, tables with T as
a column, metrics against a ``temperature`` axis, the summary of the run's own T, timing and device; the
multirun overview; sweep files whose metric a run reports; job folder names; the terminal output."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

from excitation_pullbacks.pipeline.cli import main
from excitation_pullbacks.pipeline.config import JOB_NAME_MAX, JOB_VALUE_MAX, job_folder
from excitation_pullbacks.pipeline.dashboard import Dashboard
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.tasks.figures import FiguresTask
from excitation_pullbacks.stopping import Stopped

from helpers import CLI, cli, cli_in_process, read_rows, read_wandb_run, tiny_cfg

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
FIG = ["experiment=fig3_fig4", "ascent.steps=1", "temperatures=[0.2,0.5]", "gate.temperature=0.5", "logger=wandb"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _only_run(out: Path):
    (folder,) = (out / "wandb").glob("offline-run-*")
    return read_wandb_run(folder)


@pytest.fixture(scope="module")
def figures_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash")
    os.environ.setdefault("WANDB_SILENT", "true")
    result = run(tiny_cfg(out, *FIG))
    return out, result, _only_run(out)


def test_the_run_holds_config_tags_job_type_notes_and_covers_the_work(figures_run):
    _, result, rec = figures_run
    assert result["wandb"] == rec.folder and rec.exit_code == 0
    assert rec.run.run_group == "fig3_fig4" and rec.run.job_type == "figures"
    assert set(rec.run.tags) >= {"task:figures", "model:resnet18", "gate:sigmoid", "gate_kind:uniform"}
    assert "resnet18" in rec.run.notes and "T = 0.2, 0.5" in rec.run.notes
    assert rec.config["gate"]["temperature"] == 0.5 and rec.config["temperatures"] == [0.2, 0.5]
    timing = json.loads((result["results"] / "timing.json").read_text())
    # opened before the work: its runtime covers the model passes (a run opened at the end showed ~1 s); W&B
    # records whole seconds, rounded down
    assert rec.summary["_runtime"] >= math.floor(timing["model_passes_s"])
    assert {k: rec.summary[f"timing/{k}"] for k in timing} == timing
    assert rec.summary["device"] == result["device"] == "cpu"
    assert (result["results"] / "wandb_run.txt").read_text().strip() == str(rec.folder)


def test_metrics_are_plotted_against_temperature_and_tabled_with_a_t_column(figures_run):
    _, result, rec = figures_run
    table = {r["setting"]: r for r in read_rows(result["results"] / "metrics_table.csv")}
    assert set(table) == {"0.2", "0.5", "0"}
    # the x axis: excitation/* is defined against `temperature`
    assert any(m.glob_name == "excitation/*" and m.step_metric == "temperature" for m in rec.metrics)
    rows = [h for h in rec.history if "temperature" in h]
    assert sorted(h["temperature"] for h in rows) == [0.2, 0.5]
    for h in rows:
        want = table[f"{h['temperature']:g}"]
        for key in ("logit_gain", "hit_rate", "map_hf_energy", "map_tv"):
            assert h[f"excitation/{key}"] == pytest.approx(float(want[key]))
    columns, data = rec.table("by_temperature")
    assert columns[:2] == ["method", "temperature"] and sorted(r[1] for r in data) == [0.2, 0.5]
    columns, data = rec.table("metrics")  # per image x target x method, T as a column
    assert "temperature" in columns and len(data) == len(read_rows(result["results"] / "metrics.csv"))
    # the summary is the run's own T (gate.temperature = 0.5), not the last T logged
    assert rec.summary["temperature"] == 0.5
    assert rec.summary["excitation/logit_gain"] == pytest.approx(float(table["0.5"]["logit_gain"]))
    assert rec.summary["vanilla/map_tv"] == pytest.approx(float(table["0"]["map_tv"]))
    # the gain depends on T (the old summary's only scalar, logit_before, did not)
    assert table["0.2"]["map_tv"] != table["0.5"]["map_tv"]


def test_a_failed_run_leaves_a_failed_wandb_run_and_no_results(tmp_path, monkeypatch):
    def boom(self, merged, staging):
        raise OSError("disk went away")

    monkeypatch.setattr(FiguresTask, "finalize", boom)
    with pytest.raises(OSError, match="disk went away"):
        run(tiny_cfg(tmp_path, *FIG))
    rec = _only_run(tmp_path)
    assert rec.exit_code == 1 and rec.run.job_type == "figures"
    assert not (tmp_path / "results").exists() and not (tmp_path / ".results.partial").exists()


def test_a_stopped_run_is_finished_as_stopped(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise Stopped("stopped by a test")

    monkeypatch.setattr(Dashboard, "log_results", stop)
    with pytest.raises(Stopped):
        run(tiny_cfg(tmp_path, *FIG))
    rec = _only_run(tmp_path)
    assert rec.exit_code not in (None, 0) and "stopped" in rec.run.tags
    assert not (tmp_path / "results").exists()


def test_job_folders_are_one_short_level():
    photos = job_folder(["data=folder", "data.root=/data/photos/", "gate.temperature=0.2", "name=x"], ["name"])
    assert photos.startswith("data.root=photos~") and photos.endswith(",data=folder,gate.temperature=0.2")
    assert "/" not in photos and "name=" not in photos
    other = job_folder(["data=folder", "data.root=/elsewhere/photos", "gate.temperature=0.2"])
    assert other != photos  # same last component, different paths: different folders
    long = job_folder(["temperatures=[" + ",".join(str(i / 10) for i in range(40)) + "]"])
    assert len(long) <= len("temperatures=") + JOB_VALUE_MAX and long.startswith("temperatures=[0.0,0.1")
    many = job_folder([f"key{i}=value{i}" for i in range(40)])
    assert len(many) <= JOB_NAME_MAX and many != job_folder([f"key{i}=value{i}" for i in range(41)])
    assert job_folder([]) == "default"


def test_a_failed_multirun_job_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    code, out, err = cli_in_process(
        monkeypatch,
        capsys,
        tmp_path,
        "-m",
        "experiment=fig2",
        "logger=csv",
        "data.num_images=2",
        "temperatures=[0.2]",
        "gate.temperature=0.7,0.2",  # 0.7 is not among the temperatures: that job fails
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 1
    assert err.count("error: gate.temperature=0.7 is not one of temperatures") == 1
    jobs = {r["overrides"].split()[-1]: r for r in read_rows(sweep / "jobs.csv")}
    assert {k: r["status"] for k, r in jobs.items()} == {
        "gate.temperature=0.7": "failed",
        "gate.temperature=0.2": "done",
    }
    assert (Path(jobs["gate.temperature=0.2"]["results"]) / "fig2.png").is_file()
    assert "experiment=fig2" in jobs["gate.temperature=0.7"]["overrides"]  # the full overrides
    assert "2 job(s): 1 done, 1 failed" in out


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses: the temperature multirun of the digits model, the sweep files, the terminal


@pytest.mark.slow
def test_digits_temperature_multirun_is_one_group_with_one_overview(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=temperature_sweep", "model=digits_cnn", "data=digits", "targets=digits"]
    args += ["gate.temperature=0.15,0.3,0.5", "logger=wandb", f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    jobs = read_rows(sweep / "jobs.csv")
    temps = [float(dict(o.split("=", 1) for o in r["overrides"].split())["gate.temperature"]) for r in jobs]
    assert [r["status"] for r in jobs] == ["done"] * 3 and temps == [0.15, 0.3, 0.5]
    assert "3 job(s): 3 done" in proc.stdout
    for job, t in zip(jobs, temps):
        folder = Path(job["results"]).parent
        assert f"gate.temperature={t:g}" in folder.name.split(",")
        rec = _only_run(folder)
        assert rec.run.run_group == "temperature_sweep" and rec.exit_code == 0
        temps = sorted(h["temperature"] for h in rec.history if "temperature" in h)
        assert temps == [0.0, 0.15, 0.3, 0.5, 1.0]
        table = {
            float(r["temperature"]): r
            for r in read_rows(Path(job["results"]) / "metrics_table.csv")
            if r["temperature"]
        }
        assert rec.summary["temperature"] == t
        assert rec.summary["excitation/map_hf_energy"] == pytest.approx(float(table[t]["map_hf_energy"]))
    merged = read_rows(sweep / "metrics_table.csv")
    assert len(merged) == 3 * 6  # 3 jobs x (5 temperatures + vanilla)
    (overview,) = (sweep / "wandb").glob("offline-run-*")
    rec = read_wandb_run(overview)
    assert rec.run.job_type == "multirun" and rec.run.run_group == "temperature_sweep"
    assert rec.summary["jobs_done"] == 3
    columns, data = rec.table("metrics_table")
    assert "temperature" in columns and len(data) == len(merged)


def _sweep_command(spec: dict) -> list[str]:
    """The command a W&B agent runs for a sweep's first grid point (its macros filled as the agent fills them)."""
    args = []
    for key, p in spec["parameters"].items():
        value = p["value"] if "value" in p else p["values"][0] if "values" in p else p["min"]
        args.append(f"{key}={value}")
    command = []
    for item in spec["command"]:
        if item == "${program}":
            continue
        command += args if item == "${args_no_hyphens}" else [] if item.startswith("${") else [item]
    return command


#: What makes each sweep's job small here (by its experiment); the metric names a run reports do not depend on
#: these. Other experiments run on the tiny random ResNet18 of the tests.
SMALL = {
    "experiment=digits": ["ascent.steps=2", "targets.rows=[0,1]"],
    "experiment=evaluate": [
        "evaluate.num_images=2",
        "evaluate.randomization_images=0",
        "evaluate.perturbation_steps=2",
        "evaluate.methods=[vanilla,excitation]",
        "ascent.steps=1",
    ],
    "experiment=fig3_fig4": ["ascent.steps=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_sweep_files_metric_is_in_a_runs_summary(tmp_path, monkeypatch, capsys, path):
    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "pullbacks" and spec["project"] == "excitation-pullbacks"
    command = _sweep_command(spec)
    assert "logger.mode=online" in command
    command = [c.replace("logger.mode=online", "logger.mode=offline") for c in command]
    (experiment,) = [c for c in command if c.startswith("experiment=")]
    small = [*SMALL[experiment], "logger=wandb", f"output_dir={tmp_path / 'o'}"]
    if experiment == "experiment=digits":  # the digits model and data ship with the package: run the command as it is
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["pullbacks", *command, *small])
        with pytest.raises(SystemExit) as info:
            main()
            sys.exit(0)
        code, err = info.value.code or 0, capsys.readouterr().err
    else:
        code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, *command, *small)
    assert code == 0, err
    rec = _only_run(tmp_path / "o")
    assert spec["metric"]["name"] in rec.summary, sorted(k for k in rec.summary if not k.startswith("_"))


def _pty_run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """Run a command with stdout and stderr on a pseudo-terminal; everything it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", COLUMNS="120")
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_terminal_shows_a_progress_bar_each_line_once_and_no_adverts(tmp_path):
    args = [*CLI, "experiment=digits", "figures=[fig2]", "ascent=none", "logger=csv", f"output_dir={tmp_path / 'o'}"]
    text = _pty_run(args, tmp_path)
    assert "Predicting DataLoader" in text and "100%" in text  # Lightning's bar (tqdm) in a terminal
    assert "Tip:" not in text and "LeafSpec" not in text and "anonymous" not in text
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")]
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s) for s in lines]
    plain = [s for s in lines if s and "Predicting" not in s]
    assert len(plain) == len(set(plain)), [s for s in plain if plain.count(s) > 1]
    assert sum("GPU available" in s for s in plain) == 1
    (log,) = tmp_path.glob("outputs/digits/*/pullbacks.log")
    logged = log.read_text()
    assert "GPU available" in logged  # Lightning's lines reach the log file too
    assert f"results: {tmp_path / 'o' / 'results'}" in logged and "device: cpu" in logged


@pytest.mark.slow
def test_plain_progress_lines_when_not_a_terminal(tmp_path):
    proc = cli(tmp_path, "experiment=fig2", "logger=csv", "batch_size=2", f"output_dir={tmp_path / 'o'}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert re.search(r"predict batches: (\d+)/\1 \(100%\)", out) and "Predicting DataLoader" not in out
    assert "Tip:" not in out and "LeafSpec" not in out
