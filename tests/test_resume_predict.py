"""Resumable predict runs: a run stopped by a signal keeps each finished batch as a checksummed shard; the same
command computes only the missing (or corrupted) batches and publishes results identical to an uninterrupted
run's, on one process and when resumed under DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from excitation_pullbacks.pipeline.modules import EvaluateModule, PullbackModule
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.shards import ShardStore
from excitation_pullbacks.stopping import Stopped

from helpers import CLI, DDP_SPAWN, compose_config

#: Evaluate on ten digits in five batches of two, with few methods and metric steps.
EVALUATE = [
    "experiment=evaluate_digits",
    "logger=none",
    "evaluate.num_images=10",
    "batch_size=2",
    "evaluate.methods=[vanilla,excitation]",
    "temperatures=[0.3]",
    "evaluate.randomization_images=3",
    "evaluate.randomization_layers=2",
    "evaluate.perturbation_steps=4",
    "ascent.steps=2",
]
#: Figures of all ten digits (one image per row) in five batches of two.
FIGURES = ["experiment=digits", "logger=none", "figures=[fig2]", "ascent.steps=0", "temperatures=[0.3]", "batch_size=2"]
RESULTS = {
    "evaluate": ["metrics_table.csv", "per_image.csv", "metrics.json", "methods.png", "curves.png"],
    "figures": ["tensors.pt", "metrics.csv", "metrics_table.csv", "fig2.png"],
}
MODULES = {"evaluate": EvaluateModule, "figures": PullbackModule}


def _counting(monkeypatch, module, stop_after: int | None = None) -> list[int]:
    """Count ``module.predict_step`` calls; after ``stop_after`` of them the process sends itself SIGTERM
    (a real signal, delivered between two batches)."""
    calls: list[int] = []
    original = module.predict_step

    def step(self, batch, batch_idx=0):
        out = original(self, batch, batch_idx)
        calls.append(int(batch[3][0]))
        if stop_after is not None and len(calls) == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(module, "predict_step", step)
    return calls


def _same_results(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # three runs of a minute each on 2 shared cores
@pytest.mark.parametrize("task", ["evaluate", "figures"])
def test_a_stopped_run_resumes_with_the_missing_and_corrupted_batches_only(tmp_path, monkeypatch, task):
    overrides = EVALUATE if task == "evaluate" else FIGURES
    whole = run(compose_config(*overrides, f"output_dir={tmp_path / 'whole'}"))
    assert whole["batches"] == {"batches": 5, "reused": 0, "computed": 5}

    out = tmp_path / "stopped"
    cfg = compose_config(*overrides, f"output_dir={out}")
    with monkeypatch.context() as m:
        _counting(m, MODULES[task], stop_after=3)
        with pytest.raises(Stopped, match=r"stopped by SIGTERM.*3 of 5 batches are saved.*computes only the other 2"):
            run(cfg)
    staging = out / ".results.partial"
    assert not (out / "results").exists()
    assert sorted(p.name for p in (staging / "shards").glob("c*.pt")) == [
        "c000000.r0.pt",
        "c000001.r0.pt",
        "c000002.r0.pt",
    ]
    shard = staging / "shards" / "c000001.r0.pt"  # corrupt one: it must be computed again, not trusted
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with monkeypatch.context() as m:
        calls = _counting(m, MODULES[task])
        again = run(cfg)
    assert sorted(calls) == [2, 6, 8]  # first rows of batches 1 (corrupted), 3 and 4 (missing)
    assert again["batches"] == {"batches": 5, "reused": 2, "computed": 3}
    _same_results(whole["results"], again["results"], RESULTS[task])
    assert not staging.exists() and not (again["results"] / "shards").exists()


@pytest.mark.slow  # three runs of a minute each on 2 shared cores
def test_shards_of_another_config_are_not_used(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _counting(m, EvaluateModule, stop_after=2)
        with pytest.raises(Stopped, match="2 of 5 batches"):
            run(compose_config(*EVALUATE, f"output_dir={out}"))
    other = [*EVALUATE, "evaluate.perturbation_steps=3"]
    with monkeypatch.context() as m:
        calls = _counting(m, EvaluateModule)
        result = run(compose_config(*other, f"output_dir={out}"))
    assert len(calls) == 5 and result["batches"]["reused"] == 0


def test_a_stop_inside_the_first_batch_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = EvaluateModule.predict_step

    def stop_inside(self, batch, batch_idx=0):  # the core's loops stop: the batch is not finished
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EvaluateModule, "predict_step", stop_inside)
    with pytest.raises(Stopped, match="staging folder is removed"):
        run(compose_config(*EVALUATE, f"output_dir={out}"))
    assert not (out / ".results.partial").exists() and not (out / "results").exists()


@pytest.mark.slow  # three runs of a minute each on 2 shared cores
def test_a_one_process_stop_resumes_under_ddp(tmp_path, monkeypatch):
    """The trainer is not part of a run's identity: shards saved on one process are completed by two ranks
    (each writing its own shards) and the results equal the one-process run's, byte for byte."""
    whole = run(compose_config(*EVALUATE, f"output_dir={tmp_path / 'whole'}"))
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _counting(m, EvaluateModule, stop_after=2)
        with pytest.raises(Stopped, match="2 of 5 batches"):
            run(compose_config(*EVALUATE, f"output_dir={out}"))
    again = run(compose_config(*EVALUATE, *DDP_SPAWN, f"output_dir={out}"))
    assert again["batches"] == {"batches": 5, "reused": 2, "computed": 3}
    _same_results(whole["results"], again["results"], RESULTS["evaluate"])


def test_the_shard_index_ignores_a_cut_line_and_a_foreign_file(tmp_path):
    store = ShardStore(tmp_path, "abc")
    store.open(rows=5, batch_size=2)
    row = torch.arange(2)
    store.write(0, 0, {"row": row, "x": torch.ones(2, 3), "images": torch.zeros(2, 1, 4, 4)}, {"images": 1})
    store.write(1, 1, {"row": row + 2, "x": torch.ones(2, 3), "images": torch.zeros(2, 1, 4, 4)}, {"images": 1})
    with open(store.folder / "index.r1.jsonl", "a") as f:
        f.write('{"chunk": 2, "file": "c000002.r1.pt", "si')  # cut short by an interruption
    (store.folder / "c000002.r1.pt").write_bytes(b"not a shard")
    assert sorted(store.saved()) == [0, 1] and store.missing(3) == [2] and store.count() == (2, 3)
    store.open(rows=5, batch_size=2)  # the launcher drops the untrusted file
    assert not (store.folder / "c000002.r1.pt").exists()
    store.write(2, 0, {"row": torch.tensor([4]), "x": torch.ones(1, 3), "images": torch.zeros(1, 1, 4, 4)}, {})
    merged = store.merge(3)
    assert merged["row"].tolist() == [0, 1, 2, 3, 4] and merged["x"].shape == (5, 3)
    assert merged["images"].shape == (2, 1, 4, 4)  # kept for row 0 of chunk 0 and row 4 of chunk 2 only
    assert ShardStore(tmp_path, "another config").saved() == {}
    store.open(rows=6, batch_size=2)  # other rows: the old shards are not this run's
    assert store.saved() == {}


@pytest.mark.slow  # CLI subprocesses
def test_sigterm_to_a_cli_evaluate_keeps_the_shards_and_the_rerun_resumes(tmp_path):
    args = [*CLI, *EVALUATE, "evaluate.num_images=40", "batch_size=1"]  # 40 batches
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=src)
    whole = subprocess.run(
        [*args, f"output_dir={tmp_path / 'whole'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    index = out / ".results.partial" / "shards" / "index.r0.jsonl"
    proc = subprocess.Popen(
        [*args, f"output_dir={out}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if index.is_file() and len(index.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM") and "batches are saved" in last, last
    saved = int(last.split("the results of ")[1].split(" of ")[0])
    assert 3 <= saved < 40
    again = subprocess.run(
        [*args, f"output_dir={out}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert again.returncode == 0, again.stderr
    assert f"resuming: {saved} of 40 batches are saved" in again.stdout + again.stderr
    assert f"computing the other {40 - saved}" in again.stdout + again.stderr
    _same_results(tmp_path / "whole" / "results", out / "results", RESULTS["evaluate"])


def test_row_chunks_split_the_missing_batches_among_ranks(monkeypatch):
    from excitation_pullbacks.pipeline.batches import GlobalBatches, RowChunks

    chunks = RowChunks(9, 2, [1, 3, 4])
    assert list(chunks) == [[2, 3], [6, 7], [8]]
    for rank, want in ((0, [[2, 3], [8]]), (1, [[6, 7]])):
        monkeypatch.setattr(GlobalBatches, "_world", staticmethod(lambda rank=rank: (rank, 2)))
        assert list(chunks) == want and len(chunks) == len(want)
    monkeypatch.setattr(GlobalBatches, "_world", staticmethod(lambda: (2, 3)))
    assert list(RowChunks(9, 2, [1, 4])) == [[2, 3]]  # fewer chunks than ranks: rank 2 repeats one
    assert list(RowChunks(9, 2, [])) == []
