"""``experiment=ablations``: the ``ablation`` resolver sets one parameter per job; the table pairs each setting's
per-image scores with the default job's by image id, whatever order the jobs ran in, and equals
:func:`~excitation_pullbacks.metrics.paired_difference` called on the jobs' per_image.csv files; a real multirun
through the command line writes it to CSV, Markdown and an offline W&B run."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from excitation_pullbacks import metrics as M
from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.ablation_table import write_ablation_table
from excitation_pullbacks.pipeline.manifest import MANIFEST
from excitation_pullbacks.pipeline.tables.ablations import METRICS, ablation_rows, read_jobs

from helpers import CLI, compose_config, read_rows, read_wandb_run


@pytest.mark.parametrize(
    ("setting", "temperature", "steps", "step_size", "methods"),
    [
        ("default", 0.6, 5, 20.0, ["pullback_ascent", "excitation"]),
        ("T@0.3", 0.3, 5, 20.0, ["pullback_ascent", "excitation"]),
        ("K@10", 0.6, 10, 20.0, ["pullback_ascent"]),
        ("alpha@5", 0.6, 5, 5.0, ["pullback_ascent"]),
    ],
)
def test_each_setting_changes_one_parameter(setting, temperature, steps, step_size, methods):
    cfg = compose_config("experiment=ablations", f"ablation.setting={setting}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["gate"]["temperature"] == temperature and resolved["temperatures"] == [temperature]
    assert resolved["baselines"]["pullback_ascent_steps"] == steps
    assert isinstance(resolved["baselines"]["pullback_ascent_steps"], int)
    assert resolved["baselines"]["pullback_ascent_step_size"] == step_size
    assert resolved["published"]["methods"] == methods and resolved["task"] == "published_table"


@pytest.mark.parametrize("setting", ["Q@1", "T", "T@warm", "K@1.5"])
def test_a_bad_setting_is_refused(setting):
    cfg = compose_config("experiment=ablations", f"ablation.setting={setting}")
    with pytest.raises(OmegaConfBaseException, match="ablation.setting"):
        OmegaConf.to_container(cfg, resolve=True)


def _job(root, setting: str, scores: dict, *, seed: int = 314, folder: str | None = None) -> None:
    """A finished job folder as a published_table run leaves it: config.yaml, per_image.csv, manifest.json.
    scores: {method: {dataset index: value of every metric}}; rows written in a shuffled order."""
    res = root / (folder or f"ablation.setting={setting}") / "results"
    res.mkdir(parents=True)
    config = {
        "model": {"name": "digits_cnn"},
        "data": {"kind": "digits"},
        "targets": {"rows": [0]},
        "seed": seed,
        "published": {"bootstrap": {"resamples": 500, "confidence": 0.9, "seed": 3}},
        "ablation": {"setting": setting, "defaults": {"T": 0.6, "K": 5, "alpha": 20.0}},
    }
    (res / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = [(m, i, v) for m, by in scores.items() for i, v in by.items()]
    random.Random(setting).shuffle(rows)
    lines = ["row,dataset_index,method," + ",".join(METRICS)]
    lines += [f"0,{i},{m}," + ",".join(str(v + k) for k in range(len(METRICS) - 1)) + "," for m, i, v in rows]
    (res / "per_image.csv").write_text("\n".join(lines) + "\n")
    (res / MANIFEST).write_text(json.dumps({"complete": True}))


def test_table_pairs_by_image_id_in_any_job_order(tmp_path):
    images = [7, 3, 11, 5]
    base = {m: {i: float(i) for i in images} for m in ("excitation", "pullback_ascent")}
    _job(tmp_path, "default", base)
    _job(tmp_path, "T@0.3", {m: {i: 2.0 * i for i in images} for m in base}, folder="a_first")
    _job(tmp_path, "K@1", {"pullback_ascent": {i: i + (i % 3) for i in images + [99]}})  # 99: not in the default
    rows = ablation_rows(read_jobs(tmp_path))
    assert [(r["parameter"], r["value"], r["method"]) for r in rows[:: len(METRICS) - 1]] == [
        ("T", 0.3, "excitation"),
        ("T", 0.3, "pullback_ascent"),
        ("K", 1, "pullback_ascent"),
    ]  # by ablation.defaults' order, not by folder name; focus (all empty) left out
    k = next(r for r in rows if r["parameter"] == "K" and r["metric"] == "infidelity")
    ids = sorted(images)  # the table pairs images in the order of their ids, whatever order the rows came in
    d = M.paired_difference([i + (i % 3) for i in ids], ids, resamples=500, confidence=0.9, seed=3)
    assert (k["mean"], k["low"], k["high"], k["n"]) == (d.mean, d.low, d.high, 4) and k["default"] == 5
    t = next(r for r in rows if r["parameter"] == "T" and r["metric"] == "random_logit")
    assert t["mean"] == pytest.approx(sum(images) / 4) and t["setting_mean"] - t["default_mean"] == t["mean"]


def test_table_refuses_jobs_it_cannot_pair(tmp_path):
    scores = {"excitation": {1: 0.5, 2: 0.25}}
    _job(tmp_path, "T@0.3", scores)
    with pytest.raises(PipelineError, match="no finished default job"):
        ablation_rows(read_jobs(tmp_path))
    _job(tmp_path, "default", scores, seed=1)
    with pytest.raises(PipelineError, match="differs from the default job in seed"):
        ablation_rows(read_jobs(tmp_path))
    _job(tmp_path, "T@0.3", scores, folder="again")
    with pytest.raises(PipelineError, match="two jobs .* ran ablation setting T@0.3"):
        read_jobs(tmp_path)


#: A multirun small enough for the tests: two digits, the published metrics with fewer draws.
SMALL = [
    "published.num_images=2",
    "batch_size=2",
    "+published.settings.monotonicity_correlation.samples=2",
    "+published.settings.max_sensitivity.samples=2",
    "+published.settings.infidelity.samples=1",
    "published.bootstrap.resamples=300",
    "logger=wandb",
]


@pytest.mark.slow  # a subprocess running four jobs (about 50 s of work)
def test_multirun_through_the_command_line_writes_the_table_csv_markdown_and_wandb(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=ablations", "ablation.setting=K@1,default,T@0.3,K@5", *SMALL, f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 job(s): 4 done" in proc.stdout and "ablation table:" in proc.stdout
    table = read_rows(sweep / "ablations.csv")
    same = [r for r in table if r["value"] == "5"]  # K@5 is the default: the same maps and the same metric draws
    assert len(same) == 6 and all(float(r[k]) == 0.0 for r in same for k in ("mean", "low", "high", "std"))
    table = [r for r in table if r["value"] != "5"]
    assert {(r["parameter"], r["value"], r["method"]) for r in table} == {
        ("T", "0.3", "excitation"),
        ("T", "0.3", "pullback_ascent"),
        ("K", "1", "pullback_ascent"),
    }
    assert len(table) == 3 * 6  # six metrics (no Focus mosaics in the ablations)
    # the same numbers from paired.py called on the jobs' per-image score files directly
    folders = {p.name.split("ablation.setting=")[1].split(",")[0]: p for p in sweep.glob("*ablation.setting=*")}
    per_image = {s: read_rows(f / "results" / "per_image.csv") for s, f in folders.items()}
    for r in table:
        setting = f"{r['parameter']}@{r['value']}"

        def scores(s, method=r["method"], metric=r["metric"]):
            return {int(x["dataset_index"]): float(x[metric]) for x in per_image[s] if x["method"] == method}

        a, b = scores(setting), scores("default")
        assert sorted(a) == sorted(b)
        d = M.paired_difference([a[i] for i in sorted(a)], [b[i] for i in sorted(a)], resamples=300, seed=0)
        for key in ("mean", "low", "high"):
            assert float(r[key]) == pytest.approx(getattr(d, key), rel=1e-12, abs=1e-15)
        assert int(r["n"]) == d.n == 2
    md = (sweep / "ablations.md").read_text()
    assert md.count("| T | 0.3 | 0.6 |") == 2 and md.count("| K | 1 | 5 | pullback_ascent |") == 1
    # W&B: one offline run of job type ablations holding the table, and each job's paired differences
    runs = [read_wandb_run(f) for f in (sweep / "wandb").glob("offline-run-*")]
    (ablations,) = [r for r in runs if r.run.job_type == "ablations"]
    columns, data = ablations.table("ablations")
    assert columns == list(table[0]) and len(data) == len(table) + len(same)
    got = {(row[0], row[3], row[4]): row[columns.index("mean")] for row in data if row[1] != 5}
    for r in table:
        assert got[(r["parameter"], r["method"], r["metric"])] == pytest.approx(float(r["mean"]), rel=1e-12)
    (job_run,) = (folders["default"] / "wandb").glob("offline-run-*")
    columns, data = read_wandb_run(job_run).table("paired")
    paired = read_rows(folders["default"] / "results" / "paired.csv")
    assert columns[:3] == ["method", "reference", "metric"] and len(data) == len(paired) == 7
    for row, p in zip(data, paired):  # Focus: no mosaics, no pairs, a missing value
        assert row[3] is None if p["n"] == "0" else math.isclose(row[3], float(p["mean"]), rel_tol=1e-12)


def test_write_ablation_table_from_job_folders(tmp_path):
    scores = {"pullback_ascent": {4: 1.0, 8: 3.0}}
    _job(tmp_path, "default", scores)
    _job(tmp_path, "alpha@5", {"pullback_ascent": {8: 1.0, 4: 2.0}})
    path, rows = write_ablation_table(tmp_path)
    assert read_rows(path)[0]["mean"] == str(rows[0]["mean"]) and rows[0]["mean"] == -0.5
    assert "| alpha | 5 | 20 | pullback_ascent | -0.5 [" in (tmp_path / "ablations.md").read_text()


def test_pullback_ascent_takes_k_and_alpha_from_the_baselines_options():
    import torch

    from excitation_pullbacks import variants
    from excitation_pullbacks.baselines import explainer
    from excitation_pullbacks.models import digits_images, load_digits_cnn

    model = load_digits_cnn().eval()
    x, y = (v[:3] for v in digits_images("test", 32))
    s = variants.variant_schedule("semantic")
    got = explainer("pullback_ascent", s, pullback_ascent_steps=2, pullback_ascent_step_size=3.0)(model, x, y)
    expected = variants.pullback_ascent(s, steps=2, step_size=3.0)(model, x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    default = explainer("pullback_ascent", s)(model, x, y)  # published: K 5, alpha 20
    torch.testing.assert_close(
        default, variants.pullback_ascent(s, steps=5, step_size=20.0)(model, x, y), rtol=0, atol=0
    )
    assert not torch.equal(got, default)
