"""Pipeline tests: config composition, tiny end-to-end runs, determinism, data selection, figures."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from excitation_pullbacks import build_model, pullback
from excitation_pullbacks.pipeline.classes import resolve_classes
from excitation_pullbacks.pipeline.cli import CONFIG_DIR
from excitation_pullbacks.pipeline.data import FolderDataset, build_transform, select_images
from excitation_pullbacks.pipeline.plots import PAD, labelled_grid
from excitation_pullbacks.pipeline.run import run

from helpers import compose_config, tiny_cfg

GROUPS = ["model", "data", "gate", "ascent", "baselines", "targets", "trainer", "logger", "experiment"]


def options(group: str) -> list[str]:
    """The YAML options of a config group (the ``schema`` option is the group's structured config)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    for key in GROUPS[:-1]:
        assert key in cfg
    if group == "experiment":
        assert cfg.name == option
    elif group == "model":
        timm = option.startswith("timm_")
        assert cfg.model.name == option or (timm and cfg.model.name.startswith("timm/"))
        assert cfg.model.weights == ("DEFAULT" if option == "digits_cnn" else "timm" if timm else "IMAGENET1K_V1")
    elif group == "data":
        assert cfg.data.kind == option
    elif group == "gate":
        semantic = option.startswith("semantic")
        shapes = ("hard", "none", "normal_cdf", "softsign")
        assert cfg.gate.shape == ("normal_cdf" if semantic else option if option in shapes else "sigmoid")
        assert cfg.gate.kind == {"calibrated": "calibrated", "by_depth": "by_depth"}.get(option, "uniform")
        assert cfg.gate.compat == (option if option in ("author", "semantic_author") else "default")
        assert cfg.gate.norm == ("frozen" if semantic else "hard")


def test_config_groups_have_the_documented_options():
    assert options("model") == [
        "convnext_tiny",
        "densenet121",
        "digits_cnn",
        "efficientnet_b0",
        "maxvit_t",
        "mobilenet_v3_large",
        "regnet_y_400mf",
        "resnet18",
        "resnet50",
        "swin_t",
        "swin_v2_t",
        "timm_convnext_tiny",
        "timm_deit_small",
        "timm_pvt_v2_b1",
        "vgg11_bn",
        "vit_b_16",
    ]
    assert options("data") == ["digits", "folder", "imagenette_hf", "imagenette_tv", "synthetic"]
    assert options("gate") == [
        "author",
        "by_depth",
        "calibrated",
        "hard",
        "none",
        "normal_cdf",
        "semantic",
        "semantic_author",
        "sigmoid",
        "softsign",
    ]
    assert options("baselines") == ["captum"]
    assert options("experiment") == [
        "ablations",
        "all_figures",
        "baselines",
        "digits",
        "digits_neurons",
        "evaluate",
        "evaluate_digits",
        "fig1",
        "fig2",
        "fig3_fig4",
        "path_stability",
        "path_stability_folder",
        "published_table",
        "search_by_depth",
        "search_by_type",
        "search_temperature",
        "temperature_sweep",
        "train_digits",
        "train_folder",
    ]


def test_paper_targets_and_ascent():
    cfg = compose_config("experiment=fig3_fig4")
    assert resolve_classes(cfg.targets.rows) == [0, 482, 497, 569, 574]
    assert resolve_classes(cfg.targets.extra) == [9]
    assert (cfg.ascent.steps, cfg.ascent.step_size, cfg.ascent.eps) == (10, 20.0, 100.0)
    assert cfg.temperatures == [0.3]


EXPECTED_FIGURES = {
    "fig1": ["fig1.png"],
    "fig2": ["fig2.png"],
    "fig3_fig4": ["fig3.png", "fig4.png"],
    "temperature_sweep": ["sweep_0_tench.png", "sweep_1_church.png"],
    "all_figures": ["fig1.png", "fig2.png", "fig3.png", "fig4.png", "sweep_0_tench.png", "sweep_1_church.png"],
}


@pytest.mark.parametrize("experiment", sorted(EXPECTED_FIGURES))
def test_experiment_presets_run(tmp_path, experiment):
    extra = ["ascent.steps=2", "ascent.fig1_steps=1"] if experiment in ("fig1", "fig3_fig4", "all_figures") else []
    result = run(tiny_cfg(tmp_path, f"experiment={experiment}", *extra))
    pngs = sorted(p.name for p in result["results"].glob("*.png"))
    assert pngs == sorted(EXPECTED_FIGURES[experiment])
    assert not (tmp_path / ".results.partial").exists()


def test_end_to_end_outputs(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "experiment=all_figures", "ascent.steps=2", "ascent.fig1_steps=1", "temperatures=[0.2,0.3]"
    )
    result = run(cfg)
    out = result["results"]
    t = torch.load(out / "tensors.pt", weights_only=True)
    r, k, n_t = 2, 2, 2
    assert t["images"].shape == (r, 3, 32, 32)
    assert t["vanilla"].shape == (r, k, 3, 32, 32)
    assert t["excitation"].shape == (r, n_t, k, 3, 32, 32)
    assert t["exc_ascent"].shape == (r, n_t, 2, k, 3, 32, 32)  # kept steps: fig1 (1) and final (2)
    assert t["van_ascent"].shape == (r, 2, k, 3, 32, 32)
    assert t["column_names"] == ["tench", "church"] and t["temperatures"] == ["0.2", "0.3"]
    assert t["label"].tolist() == [0, 497]
    assert t["images"].min() >= -1 and t["images"].max() <= 1

    # The stored pullbacks are the core's pullbacks of the same (seeded) model at the selected images.
    torch.manual_seed(cfg.seed)
    model = build_model("resnet18", None)
    targets = torch.tensor([[0, 497]] * r)
    torch.testing.assert_close(t["vanilla"], pullback(model, t["images"], targets, temperature=0.0))
    torch.testing.assert_close(t["excitation"][:, 1], pullback(model, t["images"], targets, temperature=0.3))
    assert not torch.allclose(t["excitation"][:, 0], t["excitation"][:, 1])
    # Ascent moved the images within the L2 ball of radius eps.
    delta = (t["exc_ascent"][:, :, -1] - t["images"][:, None, None]).flatten(3).norm(dim=3)
    assert (delta > 0).all() and (delta <= 100.0 + 1e-3).all()

    # Figure grids: R rows x (1 + K) columns of 96-pixel cells (32-pixel images upscaled 3x) under titles.
    cell = 96
    width = (1 + k) * (cell + PAD) + PAD
    panel = 22 + r * (cell + PAD) + PAD
    assert Image.open(out / "fig2.png").size == (width, 2 * (panel + 24))
    assert Image.open(out / "fig1.png").size == (width, panel + 24)
    sweep = Image.open(out / "sweep_0_tench.png")
    assert sweep.height == 22 + n_t * (cell + PAD) + PAD + 24

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == r * k * (n_t + 1)
    assert {row["method"] for row in rows} == {"excitation", "vanilla"}
    first = rows[0]
    assert float(first["logit_after"]) > float(first["logit_before"])  # ascent raises the target logit
    assert (out / "config.yaml").read_text().count("resnet18") == 1
    assert (out / "csv" / "metrics.csv").is_file()


def test_two_runs_give_identical_tensors(tmp_path):
    a = run(tiny_cfg(tmp_path / "a", "experiment=fig3_fig4", "ascent.steps=1"))["results"]
    b = run(tiny_cfg(tmp_path / "b", "experiment=fig3_fig4", "ascent.steps=1"))["results"]
    ta, tb = (torch.load(p / "tensors.pt", weights_only=True) for p in (a, b))
    for key in ("images", "vanilla", "excitation", "exc_ascent", "van_ascent"):
        assert torch.equal(ta[key], tb[key]), key
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()


def test_complete_run_is_skipped(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, "experiment=fig2")
    first = run(cfg)
    stamp = (first["results"] / "tensors.pt").stat().st_mtime_ns
    again = run(cfg)
    assert again["skipped"] and (first["results"] / "tensors.pt").stat().st_mtime_ns == stamp
    assert "skipping complete run" in capsys.readouterr().out


def test_calibrated_gate_runs_and_saves_its_schedule(tmp_path):
    out = run(tiny_cfg(tmp_path, "experiment=fig2", "gate=calibrated", "gate.calibration_batches=1"))["results"]
    from excitation_pullbacks import PerChannel

    sched = PerChannel.load(out / "calibration.pt")
    assert len(sched.temperatures) > 0
    t = torch.load(out / "tensors.pt", weights_only=True)
    assert t["temperatures"] == ["calibrated"]
    # Reusing the saved file gives the same pullbacks.
    again = run(
        tiny_cfg(tmp_path / "b", "experiment=fig2", "gate=calibrated", f"gate.calibration={out / 'calibration.pt'}")
    )["results"]
    torch.testing.assert_close(torch.load(again / "tensors.pt", weights_only=True)["excitation"], t["excitation"])


# --- data -----------------------------------------------------------------------------------------------


def _write_images(root: Path, names: list[str], size=(40, 30), mode="RGB"):
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in names:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = (torch.rand(size[1], size[0], channels, generator=g) * 255).byte().numpy()
        Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(root / name)


def test_folder_labels_from_file_and_folder_names(tmp_path):
    _write_images(tmp_path / "flat", ["0_tench.jpg", "3_chain_saw.png", "1_English_springer.jpg"])
    ds = FolderDataset(tmp_path / "flat", build_transform(32, 32))
    assert sorted(ds.labels) == [0, 217, 491]
    _write_images(tmp_path / "nested" / "golf ball", ["a.jpg"])
    _write_images(tmp_path / "nested" / "9", ["b.jpg"])
    assert sorted(FolderDataset(tmp_path / "nested", build_transform(32, 32)).labels) == [9, 574]


def test_grayscale_and_rgba_become_rgb_in_range(tmp_path):
    _write_images(tmp_path, ["0_tench.png"], mode="L")
    _write_images(tmp_path, ["1_church.png"], mode="RGBA")
    ds = FolderDataset(tmp_path, build_transform(36, 32))
    for i in range(2):
        x, _ = ds[i]
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_selection_matches_a_seeded_shuffled_dataloader(tmp_path):
    names = [f"{i}_{c}.png" for i, c in enumerate(["tench", "church", "ostrich"] * 4)]
    _write_images(tmp_path, names)
    ds = FolderDataset(tmp_path, build_transform(32, 32))
    images, labels, index = select_images(ds, [497, 0], batch_size=5, seed=314)
    # Reference: the paper's loop over a shuffled DataLoader of the images themselves.
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(314))
    first = {}
    for x, y in loader:
        for xi, yi in zip(x, y.tolist()):
            first.setdefault(yi, xi)
    assert labels.tolist() == [497, 0]
    torch.testing.assert_close(images, torch.stack([first[497], first[0]]))
    assert [ds.labels[i] for i in index.tolist()] == [497, 0]


def test_labelled_grid_layout():
    cells = torch.randn(3, 4, 3, 100, 120)
    im = labelled_grid(cells, ["a", "b", "c", "d"])
    assert im.size == (4 * (120 + PAD) + PAD, 22 + 3 * (100 + PAD) + PAD)
    with pytest.raises(ValueError):
        labelled_grid(cells, ["a"])


def test_save_trajectories_keeps_every_step(tmp_path):
    out = run(tiny_cfg(tmp_path, "experiment=fig1", "ascent.steps=2", "ascent.fig1_steps=2", "save_trajectories=true"))[
        "results"
    ]
    t = torch.load(out / "tensors.pt", weights_only=True)
    assert t["ascent_steps"] == [0, 1, 2]
    assert t["exc_ascent"].shape == (2, 1, 3, 2, 3, 32, 32)
    assert torch.equal(t["exc_ascent"][:, 0, 0], t["images"][:, None].expand(-1, 2, -1, -1, -1))
