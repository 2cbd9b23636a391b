"""The trained digits CNN that ships with the package: data split, checkpoint, excitation coverage, training,
and the pipeline's digits experiment (all offline, CPU)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from excitation_pullbacks import ImageNetInput, build_model, excitation, pullback
from excitation_pullbacks.models.digits import CHECKPOINT, DigitsCNN, digits_images, load_digits_cnn
from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.classes import class_names, resolve_class, resolve_classes
from excitation_pullbacks.pipeline.cli import CONFIG_DIR
from excitation_pullbacks.pipeline.data import FolderDataset, build_dataset, build_transform
from excitation_pullbacks.pipeline.run import run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits.py"


@pytest.fixture(scope="module")
def script():
    """scripts/train_digits.py as a module (the training code lives there, outside the installed package)."""
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Train and run the small net on one CPU thread (several are slower for it on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_digits_cnn()


@pytest.fixture(scope="module")
def test_split():
    return digits_images("test")


# --- data and checkpoint ---------------------------------------------------------------------------------


def test_split_is_fixed_disjoint_and_in_range(test_split):
    x, y = test_split
    assert x.shape == (449, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey, replicated
    assert sorted(set(y.tolist())) == list(range(10))
    again = digits_images("test")
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    # The first test labels pin the seeded permutation: a change of split would silently leak training images.
    assert y[:10].tolist() == [0, 0, 4, 1, 2, 6, 7, 0, 5, 6]

    # Train and test partition the 1797 digits (size 8: the raw pixels; no two digits are equal).
    def rows(split):
        return {tuple(v.tolist()) for v in digits_images(split, size=8)[0][:, 0].flatten(1)}

    train, test, everything = rows("train"), rows("test"), rows("all")
    assert len(everything) == 1797 and len(test) == 449 and not train & test and train | test == everything
    with pytest.raises(ValueError, match="split"):
        digits_images("val")


def test_committed_checkpoint_is_small_and_accurate(model, test_split, script):
    assert CHECKPOINT.is_file() and CHECKPOINT.stat().st_size < 300_000
    assert isinstance(model, DigitsCNN) and not model.training
    assert script.accuracy(model, *test_split) >= 0.95


def test_build_model_gives_the_trained_model(model, test_split):
    x = test_split[0][:16]
    for m in (
        build_model("digits_cnn"),
        build_model("digits_cnn", "DEFAULT"),
        build_model("digits_cnn", "digits"),
        build_model("digits_cnn", checkpoint=CHECKPOINT),
    ):
        assert isinstance(m, DigitsCNN) and not isinstance(m, ImageNetInput) and not m.training
        torch.testing.assert_close(m(x), model(x), rtol=0, atol=0)
    torch.manual_seed(0)
    random = build_model("digits_cnn", None)
    assert isinstance(random, DigitsCNN) and not torch.allclose(random(x), model(x))
    with pytest.raises(ValueError, match="no weights 'IMAGENET1K_V2'"):
        build_model("digits_cnn", "IMAGENET1K_V2")
    with pytest.raises(ValueError, match="digits_cnn"):
        build_model("resnet_nope")
    # torchvision models keep IMAGENET1K_V1 as the default weights.
    assert build_model.__defaults__[0] == "IMAGENET1K_V1"


# --- excitation on the trained model ---------------------------------------------------------------------


def test_excitation_gates_every_relu_and_max_pool(model, test_split):
    x = test_split[0][:4].clone().requires_grad_(True)
    with excitation(model, temperature=0.3) as report:
        model(x)[:, 3].sum().backward()
    assert (report.relu_calls, report.maxpool_calls) == (3, 3)
    assert list(report.relu) == ["features.2", "features.6", "features.10"]
    assert list(report.maxpool) == ["features.3", "features.7", "features.11"]
    assert not report.ungated
    exc = pullback(model, test_split[0][:4], [3] * 4)
    van = pullback(model, test_split[0][:4], [3] * 4, temperature=0)
    ref = torch.autograd.grad(model(x)[:, 3].sum(), x)[0]
    torch.testing.assert_close(van, ref, rtol=0, atol=0)
    torch.testing.assert_close(exc, x.grad)
    assert not torch.allclose(exc, van)
    assert torch.equal(exc[:, 0], exc[:, 1]) and torch.equal(exc[:, 0], exc[:, 2])  # grey input -> grey pullback


# --- training --------------------------------------------------------------------------------------------


def test_short_training_is_deterministic_and_learns(script, one_thread):
    rng = torch.get_rng_state()
    a, hist_a = script.train_digits_cnn(epochs=1, subset=640, log=None)
    b, hist_b = script.train_digits_cnn(epochs=1, subset=640, log=None)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert hist_a[0]["test_acc"] == hist_b[0]["test_acc"] > 0.5  # chance: 0.1
    assert not a.training


def test_training_script_writes_a_loadable_checkpoint(script, tmp_path, capsys, one_thread):
    out = tmp_path / "w" / "digits.pt"
    assert script.main(["--epochs", "1", "--subset", "160", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch  1" in text and "final test accuracy" in text
    assert out.is_file() and not list(out.parent.glob(".*tmp"))  # written, no temporary file left
    m = build_model("digits_cnn", checkpoint=out)
    assert script.accuracy(m, *digits_images("test")) > 0.2


# --- class spaces and data in the pipeline ---------------------------------------------------------------


def test_digit_class_space():
    assert class_names("digits") == tuple(f"digit {d}" for d in range(10))
    assert resolve_classes([3, "7", "digit 9", "Digit_0"], "digits") == [3, 7, 9, 0]
    with pytest.raises(PipelineError, match="out of range 0..9"):
        resolve_class(10, "digits")
    with pytest.raises(PipelineError, match="unknown digits class name 'tench'"):
        resolve_class("tench", "digits")
    assert resolve_classes(["tench", 999]) == [0, 999]  # ImageNet stays the default space
    with pytest.raises(PipelineError, match="class space"):
        class_names("cifar")


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=[f"output_dir={tmp_path}", "logger=csv", "trainer=cpu", *overrides])


def test_data_must_match_the_model_class_space(tmp_path):
    cfg = _cfg(tmp_path, "experiment=digits")
    assert cfg.model.classes == "digits" and cfg.data.kind == "digits"
    ds = build_dataset(cfg.data, [0, 1], "digits")
    assert len(ds) == 449 and ds[0][1] == ds.labels[0] == 0
    with pytest.raises(PipelineError, match="data=digits holds digits classes"):
        build_dataset(cfg.data, [0], "imagenet")
    tv = _cfg(tmp_path, "experiment=digits", "data=imagenette_tv")
    with pytest.raises(PipelineError, match="data=imagenette_tv holds imagenet classes"):
        run(tv)
    # An image folder is labelled in the model's space: file 0_7.png is digit 7.
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "0_7.png")
    assert FolderDataset(tmp_path, build_transform(32, 32), space="digits").labels == [7]


def test_digits_experiment_runs_end_to_end(tmp_path, one_thread):
    cfg = _cfg(
        tmp_path,
        "experiment=digits",
        "targets.rows=[0,4,9]",
        "targets.extra=[7]",
        "ascent.steps=2",
        "ascent.fig1_steps=1",
        "temperatures=[0.3,0.5]",
    )
    assert (cfg.ascent.eps, cfg.ascent.step_size) == (14.29, 2.857)
    result = run(cfg)
    out = result["results"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "fig1.png",
        "fig2.png",
        "fig3.png",
        "fig4.png",
        "sweep_0_digit_0.png",
        "sweep_1_digit_4.png",
        "sweep_2_digit_9.png",
    ]
    t = torch.load(out / "tensors.pt", weights_only=True)
    assert t["label"].tolist() == [0, 4, 9] and t["images"].shape == (3, 3, 32, 32)
    assert t["column_names"] == ["digit 0", "digit 4", "digit 9", "digit 7"]
    assert t["excitation"].shape == (3, 2, 4, 3, 32, 32)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["label_name"] for r in rows} == {"digit 0", "digit 4", "digit 9"}
    assert all(r["top1_before"] == r["label"] for r in rows)  # the trained model gets the selected images right
    ex = [r for r in rows if r["method"] == "excitation"]
    assert sum(float(r["logit_after"]) > float(r["logit_before"]) for r in ex) == len(ex)
