"""The Hypothesis 1 study's tasks on tiny settings: train (deterministic checkpoints) and path_stability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from excitation_pullbacks.pipeline.run import run

from helpers import compose_config, read_rows

TRAIN = ["experiment=train_digits", "logger=csv", "train.subset=48", "train.batch_size=16", "train.epochs=1"]


def _train(out, seed: int) -> dict:
    return run(compose_config(*TRAIN, f"seed={seed}", "train.checkpoint_steps=[0,1,2]", f"output_dir={out}"))


def test_train_is_deterministic_and_keeps_the_chosen_steps(tmp_path):
    a, b = _train(tmp_path / "a", 0), _train(tmp_path / "b", 0)
    rows = read_rows(a["results"] / "checkpoints.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # the chosen steps and the last (3 steps of 16)
    states = []
    for r in rows:
        sa = torch.load(a["results"] / "checkpoints" / r["file"], weights_only=True)
        sb = torch.load(b["results"] / "checkpoints" / r["file"], weights_only=True)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        states.append(sa)
    assert not torch.equal(states[0]["classifier.weight"], states[-1]["classifier.weight"])
    logged = read_rows(a["results"] / "csv_train" / "metrics.csv")
    assert any(r.get("train/loss") for r in logged) and any(r.get("checkpoint/test_acc") for r in logged)
    assert Image.open(a["results"] / "training.png").size[0] > 100
    # the time split: training steps, the epoch's validation and the 4 checkpoints' held-out accuracy are
    # model passes, each timed; everything else is the rest of the wall time
    timing = json.loads((a["results"] / "timing.json").read_text())
    parts = [timing["steps_s"], timing["validation_s"], timing["held_out_s"]]
    assert all(p > 0 for p in parts) and timing == a["timing"]
    assert timing["model_passes_s"] == pytest.approx(sum(parts), abs=2e-3)
    assert timing["other_s"] == pytest.approx(timing["total_s"] - timing["model_passes_s"], abs=2e-3)


@pytest.mark.slow  # two train runs and the study: about a minute on 2 cores
def test_path_stability_over_two_seeds(tmp_path):
    for seed in (0, 1):
        _train(tmp_path / f"seed{seed}", seed)
    cfg = compose_config(
        "experiment=path_stability",
        "logger=csv",
        f"stability.runs='{tmp_path}/seed{{seed}}/results'",  # quoted: braces
        "stability.control_seeds=[0,1]",
        "stability.num_images=24",
        "batch_size=16",  # two batches, merged
        "temperatures=[0.3,1.0]",
        "seed=0",
        f"output_dir={tmp_path / 'ps'}",
    )
    res = run(cfg)["results"]
    data = json.loads((res / "stability.json").read_text())  # strict JSON: NaN written as null
    assert data["steps"] == data["control_steps"] == [0, 1, 2, 3] and data["control_seed"] == 1
    rho = np.array(data["rho_pooled"], dtype=float)
    assert rho.shape == (4, 4) and np.allclose(np.diag(rho), 1.0)  # own gates: f_G = f
    assert np.all(np.abs(np.array(data["rho_control_pooled"], dtype=float)) <= 1 + 1e-9)
    agreement = np.array(data["gate_agreement_with_final"])  # (K, sites)
    assert agreement.shape == (4, 6) and np.allclose(agreement[-1], 1.0)
    assert np.array(data["path_rho_mean"]).shape == (2, 4)
    rows = read_rows(res / "rho.csv")
    assert {r["kind"] for r in rows} == {"own", "control"} and len(rows) == 2 * 16 * 11
    for name in ("rho_heatmap.png", "stability_curves.png", "gate_overlap.csv", "soft_vs_binary.csv"):
        assert (res / name).is_file()
