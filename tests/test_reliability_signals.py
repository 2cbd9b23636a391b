"""Runs stop cleanly on SIGINT/SIGTERM (exit code, one error line, nothing published, handlers restored, the
re-run completes), and the core's long loops stop on request and leave the model as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
import torch

from excitation_pullbacks import ascent
from excitation_pullbacks.metrics import deletion
from excitation_pullbacks.stopping import Stopped

from helpers import (
    CLI,
    assert_model_unchanged,
    assert_nothing_written,
    assert_one_error_line,
    cli_in_process,
    model_state,
    tiny_overrides,
)


@pytest.mark.slow
def test_sigterm_stops_a_cli_job_and_the_rerun_completes(tmp_path):
    out = tmp_path / "out"
    args = [*CLI, *tiny_overrides("experiment=fig3_fig4", "ascent.steps=12", "logger=none", f"output_dir={out}")]
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # Hydra's log: the job is inside the ascent loop
        if "ascent steps along excitation" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM") and "run the same command" in err
    assert_nothing_written(out)
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert (out / "results" / "manifest.json").is_file()


def test_sigint_stops_an_in_process_run_and_restores_handlers(tmp_path, monkeypatch, capsys):
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    staging = tmp_path / "out" / ".results.partial"

    def interrupt_when_running():
        deadline = time.monotonic() + 60
        while not staging.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, "experiment=fig3_fig4", "ascent.steps=200", f"output_dir={tmp_path / 'out'}"
    )
    assert code == 130
    assert_one_error_line(code, err, "stopped by SIGINT", "run the same command again")
    assert_nothing_written(tmp_path / "out")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous


def test_core_loops_stop_on_request_and_leave_the_model(tiny_net):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    before = model_state(tiny_net)
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Stopped):
        ascent(tiny_net, x, [0, 1], steps=50, should_stop=stop_after_three)
    assert len(calls) == 4
    assert_model_unchanged(tiny_net, before)
    with pytest.raises(Stopped):
        deletion(tiny_net, x, x, [0, 1], steps=8, batch_size=2, should_stop=lambda: True)
