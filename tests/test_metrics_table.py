"""The ``published_table`` task: a small run on the digits CNN writes the table (CSV + Markdown), the per-image
scores, the paired differences and the Focus figure; the per-image scores equal the metric functions called
directly with the published settings."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from excitation_pullbacks import metrics as M
from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.tasks.published_table import COLUMNS

from helpers import DDP_SPAWN, compose_config, read_rows, read_wandb_run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (several threads on a busy machine only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = [
    "experiment=published_table",
    "logger=csv",
    "published.methods=[excitation,vanilla,deeplift]",
    "+published.settings.monotonicity_correlation.samples=2",
    "+published.settings.max_sensitivity.samples=2",
    "+published.settings.infidelity.samples=1",
    "published.num_images=4",
    "published.mosaics=3",
    "published.mosaic_pool=40",
    "published.figure_rows=2",
    "batch_size=2",
]


def test_published_table_on_digits(tmp_path):
    cfg = compose_config(f"output_dir={tmp_path}", *SMALL)
    run(cfg)
    res = tmp_path / "results"
    rows = list(csv.DictReader((res / "published_table.csv").open()))
    assert [r["method"] for r in rows] == ["excitation", "vanilla", "deeplift"]
    for r in rows:
        for name in M.METRIC_NAMES:
            assert r[f"{name}_n"] == "4" and math.isfinite(float(r[f"{name}_mean"]))
        assert r["focus_n"] == "3" and 0 <= float(r["focus_mean"]) <= 1
    md = (res / "published_table.md").read_text()
    assert md.count("\n") == 2 + 3 and "±" in md and all(name in md for name in COLUMNS)
    paired = list(csv.DictReader((res / "paired.csv").open()))
    assert len(paired) == 2 * len(COLUMNS) and {p["reference"] for p in paired} == {"excitation"}
    assert all(float(p["low"]) <= float(p["mean"]) <= float(p["high"]) for p in paired)
    assert (res / "focus.png").stat().st_size > 5000
    per_image = list(csv.DictReader((res / "per_image.csv").open()))
    assert len(per_image) == 4 * 3
    # the vanilla rows equal the metric functions called on the same images (deterministic metrics)
    from excitation_pullbacks.baselines import explainer
    from excitation_pullbacks.models import digits_images, load_digits_cnn

    x, y = digits_images("test", 32)
    idx = torch.tensor([int(r["dataset_index"]) for r in per_image if r["method"] == "vanilla"])
    model = load_digits_cnn().eval()
    maps = explainer("vanilla")(model, x[idx], y[idx])
    settings = M.PUBLISHED.scaled(32).settings("faithfulness_estimate")
    expected = M.faithfulness_estimate(model, x[idx], y[idx], maps, **settings)
    got = torch.tensor(
        [float(r["faithfulness_estimate"]) for r in per_image if r["method"] == "vanilla"], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-6)


def test_published_table_rejects_bad_settings(tmp_path):
    with pytest.raises(PipelineError, match="published.methods"):
        run(compose_config(f"output_dir={tmp_path}", *SMALL, "published.methods=[vanilla,lrp]"))
    with pytest.raises(PipelineError, match="published.settings"):
        run(compose_config(f"output_dir={tmp_path}", *SMALL, "+published.settings.focal.samples=2"))
    with pytest.raises(PipelineError, match="mosaics"):
        run(compose_config(f"output_dir={tmp_path}", *SMALL, "published.mosaics=9"))


def test_paired_differences_are_a_wandb_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    small = [o for o in SMALL if not o.startswith(("logger=", "published.methods", "published.num_images"))]
    small += ["logger=wandb", "published.methods=[excitation,vanilla]", "published.num_images=2", "published.mosaics=0"]
    result = run(compose_config(f"output_dir={tmp_path}", *small, "published.bootstrap.resamples=50"))
    rec = read_wandb_run(result["wandb"])
    paired = read_rows(result["results"] / "paired.csv")
    columns, data = rec.table("paired")
    assert columns == list(paired[0]) == ["method", "reference", "metric", "mean", "low", "high", "std", "n",
                                          "confidence", "resamples"]  # fmt: skip
    assert len(data) == len(paired) == len(COLUMNS)  # vanilla - excitation per metric (Focus: no mosaics, n = 0)
    for row, p in zip(data, paired):
        assert row[:3] == ["vanilla", "excitation", p["metric"]] and row[-1] == 50
        if p["n"] != "0":
            assert row[3] == pytest.approx(float(p["mean"]), rel=1e-12) and row[7] == 2
    columns, data = rec.table("metrics")
    assert columns[0] == "method" and [r[0] for r in data] == ["excitation", "vanilla"]


def test_published_table_rejects_bad_bootstrap_settings(tmp_path):
    with pytest.raises(PipelineError, match="resamples"):
        run(compose_config(f"output_dir={tmp_path}", *SMALL, "published.bootstrap.resamples=0"))
    with pytest.raises(PipelineError, match="unknown keys"):
        run(compose_config(f"output_dir={tmp_path}", *SMALL, "+published.bootstrap.draws=5"))


@pytest.mark.slow  # two processes
def test_published_table_under_ddp_equals_one_process(tmp_path):
    """Images split across two CPU ranks (spawned: the explainers and the protocol are pickled), merged on
    rank 0: the same bytes in the per-image scores, the table and the paired differences (each batch seeds
    its draws by its first row, whichever rank runs it)."""
    one = run(compose_config(f"output_dir={tmp_path / 'one'}", *SMALL))
    two = run(compose_config(f"output_dir={tmp_path / 'two'}", *SMALL, *DDP_SPAWN))
    for name in ("per_image.csv", "published_table.csv", "paired.csv"):
        assert (one["results"] / name).read_bytes() == (two["results"] / name).read_bytes(), name
    assert len(read_rows(two["results"] / "per_image.csv")) == 4 * 3
