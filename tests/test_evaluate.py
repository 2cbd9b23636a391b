"""The evaluate task: metric table, agreement with direct metric calls, transfer, W&B, Optuna search."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from excitation_pullbacks import Excitation, Site, build_model
from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import explainer
from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.data import build_dataset, evaluation_images
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.schedules import gate_settings
from excitation_pullbacks.pipeline.transfer_models import transfer_models

from helpers import DDP_SPAWN, cli, compose_config, read_rows, read_wandb_run, tiny_cfg

SMALL = [
    "experiment=evaluate",
    "evaluate.num_images=3",
    "evaluate.perturbation_steps=4",
    "baselines.smoothgrad_samples=2",
    "baselines.ig_steps=2",
    "ascent.steps=1",
    "evaluate.randomization_images=2",
    "evaluate.randomization_layers=2",
    "temperatures=[0.3,1.0]",
    "batch_size=2",
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_cfg(out, *SMALL, "evaluate.transfer_models=[resnet18]", "logger=wandb", "logger.mode=offline")
    return cfg, run(cfg)


def test_table_files_and_objective(evaluated):
    _, result = evaluated
    res = result["results"]
    for name in (
        "metrics_table.csv",
        "metrics.json",
        "per_image.csv",
        "curves.png",
        "randomization.png",
        "methods.png",
        "config.yaml",
        "timing.json",
    ):
        assert (res / name).is_file(), name
    table = read_rows(res / "metrics_table.csv")
    assert [r["setting"] for r in table] == [
        "vanilla",
        "smoothgrad",
        "guided_backprop",
        "integrated_gradients",
        "excitation T=0.3",
        "excitation T=1",
    ]
    data = json.loads((res / "metrics.json").read_text())
    assert data["objective"] == {"metric": "insertion_auc", "setting": "excitation T=0.3", "value": result["objective"]}
    per_image = [r for r in read_rows(res / "per_image.csv") if r["setting"] == "excitation T=0.3"]
    assert len(per_image) == 3
    mean = sum(float(r["insertion_auc"]) for r in per_image) / 3
    assert result["objective"] == pytest.approx(mean, rel=1e-12)
    assert float(table[4]["insertion_auc"]) == pytest.approx(mean, rel=1e-12)
    # integrated gradients is not an ascent direction by default: its ascent cells are empty
    assert table[3]["ascent_gain"] == "" and table[0]["ascent_gain"] != ""


def test_per_image_metrics_match_direct_calls(evaluated):
    cfg, result = evaluated
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model.name, cfg.model.weights)
    dataset = build_dataset(cfg.data, [0, 497])
    x, labels, _ = evaluation_images(dataset, 3, int(cfg.seed))
    rows = read_rows(result["results"] / "per_image.csv")
    for setting, explain in [
        ("vanilla", explainer("vanilla")),
        ("excitation T=1", explainer("excitation", temperature=1.0)),
    ]:
        maps = explain(model, x, labels)
        got = [r for r in rows if r["setting"] == setting]
        dele = M.deletion(model, x, maps, labels, steps=4, baseline="blur")
        ins = M.insertion(model, x, maps, labels, steps=4, baseline="blur")
        tv = M.total_variation(maps)
        for i in range(3):
            assert float(got[i]["deletion_auc"]) == pytest.approx(float(dele[i]), rel=1e-5)
            assert float(got[i]["insertion_auc"]) == pytest.approx(float(ins[i]), rel=1e-5)
            assert float(got[i]["map_tv"]) == pytest.approx(float(tv[i]), rel=1e-5)


def test_transfer_to_an_identical_model_equals_the_source(evaluated):
    _, result = evaluated
    for r in read_rows(result["results"] / "per_image.csv"):
        if r["ascent_gain"]:
            assert float(r["transfer_gain/resnet18"]) == pytest.approx(float(r["ascent_gain"]), rel=1e-5, abs=1e-6)
            assert r["transfer_flip/resnet18"] == r["ascent_flip_rate"]


def test_guided_backprop_control_and_randomization_curves(evaluated):
    _, result = evaluated
    data = json.loads((result["results"] / "metrics.json").read_text())
    rand = data["randomization"]
    assert rand["layers"] == ["backbone.fc", "backbone.layer4.1.conv2"]
    table = {r["setting"]: r for r in data["table"]}
    # the classic control: guided backprop's maps barely change when the top layers are randomised
    for key in ("randomization_spearman_top", "randomization_spearman_mean"):
        assert table["guided_backprop"][key] > 0.95
        assert table["guided_backprop"][key] > table["vanilla"][key] + 0.2
    assert len(rand["ssim"]["vanilla"]) == 2


def test_table_and_curves_logged_to_wandb(evaluated):
    _, result = evaluated
    rec = read_wandb_run(result["wandb"])
    assert rec.exit_code == 0 and rec.run.job_type == "evaluate"
    assert list(rec.folder.glob("files/media/images/figures/curves_*.png"))
    assert list(rec.folder.glob("files/media/images/figures/randomization_*.png"))
    table = read_rows(result["results"] / "metrics_table.csv")
    columns, rows = rec.table("metrics")
    assert columns == list(table[0]) and len(rows) == len(table)
    columns, rows = rec.table("per_image")  # per image x method x T, T as a column
    assert "temperature" in columns and len(rows) == len(read_rows(result["results"] / "per_image.csv"))
    # every metric against T: one history row per excitation temperature
    excitation = {float(r["temperature"]): r for r in table if r["method"] == "excitation"}
    by_t = {h["temperature"]: h for h in rec.history if "temperature" in h}
    assert set(by_t) == set(excitation)
    for t, h in by_t.items():
        assert h["excitation/insertion_auc"] == pytest.approx(float(excitation[t]["insertion_auc"]))
    assert rec.summary["objective"] == pytest.approx(result["objective"])
    assert rec.summary["vanilla/insertion_auc"] == pytest.approx(
        float(next(r for r in table if r["method"] == "vanilla")["insertion_auc"])
    )


def test_depth_schedule_splits_relu_calls_into_groups():
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4, 4), nn.ReLU())]).double()
    gate = compose_config("gate=by_depth", "gate.depth_temperatures=[0.1,0.2,0.3]").gate
    (setting,) = gate_settings(gate, [0.7], model=net, example=torch.zeros(1, 4, dtype=torch.float64))
    sched = setting.schedule
    seen = []
    with Excitation(net, sched, observer=lambda site, z, gate: seen.append(float(gate.temperature))):
        net(torch.zeros(1, 4, dtype=torch.float64))
    assert seen == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    pool = sched(Site("pool", "maxpool"))
    assert pool.shape == "softmax" and pool.temperature == 0.7


def test_bad_method_and_objective_write_nothing(tmp_path):
    with pytest.raises(PipelineError, match="unknown method"):
        run(tiny_cfg(tmp_path / "a", *SMALL, "evaluate.methods=[vanilla,lrp]"))
    assert not (tmp_path / "a" / "results").exists() and not (tmp_path / "a" / ".results.partial").exists()
    with pytest.raises(PipelineError, match="not a table column"):
        run(
            tiny_cfg(
                tmp_path / "b",
                *SMALL,
                "evaluate.methods=[excitation]",
                "evaluate.num_images=1",
                "evaluate.randomization_images=0",
                "evaluate.objective=accuracy",
            )
        )
    assert not (tmp_path / "b" / "results").exists() and not (tmp_path / "b" / ".results.partial").exists()


@pytest.mark.slow  # subprocesses / several processes
def test_optuna_search_returns_the_objective_and_merges_tables(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        tmp_path,
        "-m",
        "experiment=search_temperature",
        "hydra.sweeper.n_trials=2",
        "evaluate.num_images=2",
        "evaluate.perturbation_steps=4",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = sorted(sweep.glob("*/results/metrics.json"))
    assert len(jobs) == 2
    values = {json.loads(p.read_text())["objective"]["value"]: p for p in jobs}
    assert best["best_value"] == pytest.approx(max(values))
    best_job = values[max(values)].parent.parent.name
    assert f"gate.temperature={best['best_params']['gate.temperature']}," in best_job
    merged = read_rows(sweep / "metrics_table.csv")
    assert sorted(r["job"] for r in merged) == sorted(p.parent.parent.name for p in jobs)


def test_digits_preset_runs_on_the_trained_model(tmp_path):
    cfg = compose_config(
        "experiment=evaluate_digits",
        "logger=none",
        f"output_dir={tmp_path}",
        "evaluate.num_images=4",
        "evaluate.randomization_images=2",
        "baselines.smoothgrad_samples=2",
        "baselines.ig_steps=2",
        "evaluate.perturbation_steps=4",
        "ascent.steps=1",
    )
    result = run(cfg)
    table = read_rows(result["results"] / "metrics_table.csv")
    assert [r["setting"] for r in table][-5:] == [f"excitation T={t}" for t in ("0.1", "0.2", "0.3", "0.5", "1")]
    assert all(r["model"] == "digits_cnn" for r in table)
    assert json.loads((result["results"] / "metrics.json").read_text())["randomization"]["layers"][0] == "classifier"


@pytest.mark.slow  # subprocesses / several processes
def test_ddp_spawn_two_processes_equal_one(tmp_path):
    common = [
        *SMALL,
        "evaluate.methods=[vanilla,excitation]",
        "temperatures=[0.3]",
        "batch_size=1",
        "evaluate.randomization_images=1",
    ]
    one = run(tiny_cfg(tmp_path / "one", *common))
    two = run(
        tiny_cfg(
            tmp_path / "two",
            *common,
            *DDP_SPAWN,
        )
    )
    a, b = (read_rows(r["results"] / "per_image.csv") for r in (one, two))
    assert [r["row"] for r in b] == ["0", "0", "1", "1", "2", "2"]  # three images over two ranks, merged in order
    numeric = [
        k
        for k in a[0]
        if k.startswith(("deletion", "insertion", "map_", "randomization", "ascent_g", "ascent_hf", "ascent_tv"))
    ]
    for ra, rb in zip(a, b):
        for key in ra:
            if key in numeric and ra[key]:
                assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-5, abs=1e-7), key
            else:
                assert ra[key] == rb[key], key
    assert one["objective"] == pytest.approx(two["objective"], rel=1e-6)


def test_baselines_figure_shares_the_paper_grid(tmp_path):
    result = run(tiny_cfg(tmp_path, "experiment=baselines", "baselines.smoothgrad_samples=2", "baselines.ig_steps=2"))
    res = result["results"]
    assert (res / "baselines.png").is_file()
    tensors = torch.load(res / "tensors.pt", weights_only=True)
    rows, methods, cols = tensors["baselines"].shape[:3]
    assert (rows, methods, cols) == (2, 4, 2)
    # Captum's Saliency column is the engine's vanilla gradient of the same image and target
    torch.testing.assert_close(tensors["baselines"][:, 0], tensors["vanilla"], rtol=1e-5, atol=1e-8)
    with pytest.raises(PipelineError, match="baselines.methods"):
        run(tiny_cfg(tmp_path / "bad", "experiment=baselines", "baselines.methods=[excitation]"))


def test_transfer_models_from_names_and_checkpoints(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save(build_model("digits_cnn", None).state_dict(), ckpt)
    entries = OmegaConf.create(["digits_cnn", {"name": "digits_cnn", "checkpoint": str(ckpt)}])
    models = transfer_models(entries, "DEFAULT", seed=0)
    assert list(models) == ["digits_cnn", "digits_cnn:other"]
    for (k, a), b in zip(models["digits_cnn:other"].state_dict().items(), torch.load(ckpt).values()):
        assert torch.equal(a, b), k
    with pytest.raises(PipelineError, match="twice"):
        transfer_models(OmegaConf.create(["digits_cnn", "digits_cnn"]), "DEFAULT", seed=0)
