"""task=train on an image folder (one sub-folder per class) with a torchvision classifier: seeded batches and
split, deterministic checkpoints that build_model and path_stability load, one error line for bad input, DDP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from excitation_pullbacks.models import build_model
from excitation_pullbacks.pipeline.batches import GlobalBatches
from excitation_pullbacks.pipeline.errors import PipelineError
from excitation_pullbacks.pipeline.image_folder import class_folder, stratified_split
from excitation_pullbacks.pipeline.run import run

from helpers import DDP_SPAWN, assert_nothing_written, assert_one_error_line, cli_in_process, compose_config, read_rows

CLASSES = ["circles", "plain", "stripes"]  # sorted: ImageFolder's class order
#: resnet18 from random init at 32 x 32; 9 training images (3 of each class held out) -> 2 steps per epoch.
FOLDER = [
    "experiment=train_folder",
    "logger=csv",
    "data.resize=32",
    "data.crop=32",
    "train.batch_size=4",
    "train.epochs=2",
    "train.val_fraction=0.25",
    "train.checkpoint_steps=[0,1,2]",
]


def write_folder(root, per_class: int = 4):
    """root/<class>/<i>.png|jpg: per class a 48 x 40 RGB pattern (disc, flat grey, vertical stripes) plus seeded
    noise, PNG and JPEG alternating. Returns root."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :48]
    patterns = {
        "circles": ((yy - 20) ** 2 + (xx - 24) ** 2 < 150).astype(float),
        "plain": np.full((40, 48), 0.5),
        "stripes": (xx // 4 % 2).astype(float),
    }
    for name, base in patterns.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = np.clip(base[..., None] * 200 + rng.normal(0, 30, (40, 48, 3)) + 20, 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _train(folder, out, *extra: str) -> dict:
    return run(compose_config(*FOLDER, f"data.root={folder}", f"output_dir={out}", *extra))


def _states(results) -> dict[str, dict]:
    return {
        r["file"]: torch.load(results / "checkpoints" / r["file"], weights_only=True)
        for r in read_rows(results / "checkpoints.csv")
    }


def test_global_batches_split_the_one_process_batches_across_ranks():
    one = GlobalBatches(10, 4, seed=3)
    assert len(one) == 3 and len(GlobalBatches(10, 4, seed=3, drop_last=True)) == 2
    for epoch in range(3):
        batches = one.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(10))  # each item once per pass
        assert [len(b) for b in batches] == [4, 4, 2]
        assert batches == GlobalBatches(10, 4, seed=3).epoch_batches(epoch)  # seeded
        for world in (2, 3):
            parts = [one.epoch_batches(epoch, rank, world) for rank in range(world)]
            for s, batch in enumerate(batches):
                joined = [i for rank in range(world) for i in parts[rank][s]]
                assert len({len(p[s]) for p in parts}) == 1  # equal parts
                assert joined[: len(batch)] == batch  # the global batch, in order, then padding from its start
                assert joined[len(batch) :] == (batch * world)[: len(joined) - len(batch)]
    assert one.epoch_batches(0) != one.epoch_batches(1) != GlobalBatches(10, 4, seed=4).epoch_batches(1)
    assert list(iter(one)) == one.epoch_batches(0) and list(iter(one)) == one.epoch_batches(1)  # passes advance


def test_stratified_split():
    labels = [0] * 5 + [1] * 2 + [2] * 1 + [3] * 10
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    held = [labels[i] for i in val.tolist()]
    assert [held.count(c) for c in range(4)] == [1, 1, 0, 2]  # rounded, >= 1 of a class of 2+, never all
    again, other = stratified_split(labels, 0.2, seed=0), stratified_split(labels, 0.2, seed=1)
    assert torch.equal(again[1], val) and not torch.equal(other[1], val)


@pytest.mark.slow  # two runs: about 20 s on 2 cores (the digits determinism test covers the same loop quickly)
def test_train_on_a_folder_is_deterministic_and_loads_back(tmp_path):
    folder = write_folder(tmp_path / "photos")
    a, b = (_train(folder, tmp_path / out, "train.epochs=1") for out in ("a", "b"))
    rows = read_rows(a["results"] / "checkpoints.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # the chosen steps (the last: 1 epoch x 2 steps)
    sa, sb = _states(a["results"]), _states(b["results"])
    for name, state in sa.items():
        assert state.keys() == sb[name].keys() and all(torch.equal(state[k], sb[name][k]) for k in state)
    assert not torch.equal(sa["step_000000.pt"]["fc.weight"], sa["step_000002.pt"]["fc.weight"])
    assert sa["step_000000.pt"]["fc.weight"].shape == (3, 512)  # one logit per class folder
    info = json.loads((a["results"] / "checkpoints" / "model.json").read_text())
    assert info == {"name": "resnet18", "num_classes": 3, "classes": CLASSES, "size": 32}
    # the final checkpoint, loaded as any task loads a model, gives the held-out accuracy the run recorded
    data = compose_config(*FOLDER, f"data.root={folder}").data
    images = class_folder(data)
    _, val = stratified_split(images.labels, 0.25, seed=0)
    x = torch.stack([images[i][0] for i in val.tolist()])
    y = torch.tensor([images.labels[i] for i in val.tolist()])
    model = build_model("resnet18", None, checkpoint=a["results"] / "checkpoints" / rows[-1]["file"], num_classes=3)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(float(rows[-1]["test_acc"]), abs=1e-6)
    logged = read_rows(a["results"] / "csv_train" / "metrics.csv")
    assert sum(bool(r.get("train/loss")) for r in logged) == 2  # every step
    assert any(r.get("val/acc") for r in logged) and any(r.get("checkpoint/test_acc") for r in logged)


def test_the_digits_cnn_trains_on_a_folder(tmp_path):
    folder = write_folder(tmp_path / "photos")
    res = _train(folder, tmp_path / "out", "model=digits_cnn", "train.epochs=1")["results"]
    info = json.loads((res / "checkpoints" / "model.json").read_text())
    assert info["name"] == "digits_cnn" and info["num_classes"] == 3
    last = res / "checkpoints" / read_rows(res / "checkpoints.csv")[-1]["file"]
    model = build_model("digits_cnn", None, checkpoint=last, num_classes=3)
    assert model.classifier.out_features == 3


@pytest.mark.parametrize(
    ("setup", "overrides", "fragments"),
    [
        ("none", ["data=folder"], ["does not exist"]),
        ("one_class", ["data=folder"], ["1 class sub-folder", "at least 2"]),
        ("empty_class", ["data=folder"], ["plain"]),
        ("ok", ["data=folder", "model.name=googlenet", "data.resize=64", "data.crop=64"], ["googlenet", "not logits"]),
        ("ok", ["data=imagenette_tv"], ["data=digits or data=folder"]),
    ],
)
def test_bad_input_gives_one_error_line(monkeypatch, capsys, tmp_path, setup, overrides, fragments):
    folder = tmp_path / "photos"
    if setup == "one_class":
        write_folder(folder)
        for name in CLASSES[1:]:
            for f in (folder / name).iterdir():
                f.unlink()
            (folder / name).rmdir()
    elif setup in ("ok", "empty_class"):
        write_folder(folder)
    if setup == "empty_class":
        for f in (folder / "plain").iterdir():
            f.unlink()
    out = tmp_path / "out"
    # the data group named on the command line: it replaces the tiny runs' synthetic data
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, *FOLDER, *overrides, f"data.root={folder}", f"output_dir={out}"
    )
    assert_one_error_line(code, err, *fragments)
    assert_nothing_written(out)


@pytest.mark.parametrize("resumable", [True, False], ids=["resume-state", "resume_signals=[]"])
def test_sigint_stops_training_between_steps(monkeypatch, capsys, tmp_path, resumable):
    """SIGINT stops between steps: by default with the training state saved (the same command resumes), with
    train.resume_signals=[] with nothing left."""
    folder, out = write_folder(tmp_path / "photos"), tmp_path / "out"
    first = out / ".results.partial" / "checkpoints" / "step_000001.pt"

    def interrupt_after_the_first_step():
        deadline = time.monotonic() + 120
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_the_first_step, daemon=True).start()
    code, _, err = cli_in_process(
        monkeypatch,
        capsys,
        tmp_path,
        *FOLDER,
        "data=folder",
        "train.epochs=500",
        f"data.root={folder}",
        f"output_dir={out}",
        *([] if resumable else ["train.resume_signals=[]"]),
    )
    assert code == 130
    if resumable:
        assert_one_error_line(code, err, "stopped by SIGINT", "run the same command again and it resumes from step")
        assert (out / ".results.partial" / "resume" / "state.json").is_file() and not (out / "results").exists()
    else:
        assert_one_error_line(code, err, "stopped by SIGINT", "run the same command again")
        assert_nothing_written(out)


@pytest.mark.slow  # one run on one process and one on two (gloo): about a minute on 2 cores
def test_ddp_training_keeps_the_same_checkpoints(tmp_path):
    """Two CPU processes: the same steps, files and initialisation as one process, every global batch split
    across the ranks. The weights after step 0 differ: on CPUs each rank normalises its half of the batch by
    its own BatchNorm statistics (SyncBatchNorm needs GPUs), and the running statistics saved are rank 0's."""
    folder = write_folder(tmp_path / "photos")
    one = _train(folder, tmp_path / "one", "trainer=cpu")
    ddp = _train(folder, tmp_path / "ddp", *DDP_SPAWN)
    rows_one, rows_ddp = read_rows(one["results"] / "checkpoints.csv"), read_rows(ddp["results"] / "checkpoints.csv")
    assert [(r["step"], r["epoch"], r["file"]) for r in rows_ddp] == [
        (r["step"], r["epoch"], r["file"]) for r in rows_one
    ]
    a, b = _states(one["results"]), _states(ddp["results"])
    assert all(torch.equal(a["step_000000.pt"][k], b["step_000000.pt"][k]) for k in a["step_000000.pt"])
    for name in list(a)[1:]:
        assert b[name].keys() == a[name].keys()
        assert all(torch.isfinite(v.double()).all() for v in b[name].values())
        assert not torch.equal(b[name]["fc.weight"], b["step_000000.pt"]["fc.weight"])  # trained
    assert (ddp["results"] / "checkpoints" / "model.json").read_text() == (
        one["results"] / "checkpoints" / "model.json"
    ).read_text()
    logged = read_rows(ddp["results"] / "csv_train" / "metrics.csv")
    assert sum(bool(r.get("train/loss")) for r in logged) == 4


@pytest.mark.slow  # two train runs and the study: about a minute on 2 cores
def test_path_stability_on_folder_checkpoints(tmp_path):
    folder = write_folder(tmp_path / "photos")
    for seed in (0, 1):
        _train(folder, tmp_path / f"seed{seed}", f"seed={seed}")
    study = [
        "experiment=path_stability_folder",
        "logger=csv",
        f"data.root={folder}",
        "data.resize=32",
        "data.crop=32",
        f"stability.runs='{tmp_path}/seed{{seed}}/results'",  # quoted: braces
        "stability.num_images=8",
        "batch_size=4",  # two batches, merged
        "temperatures=[0.3]",
    ]
    res = run(compose_config(*study, f"output_dir={tmp_path / 'ps'}"))["results"]
    data = json.loads((res / "stability.json").read_text())
    assert data["steps"] == data["control_steps"] == [0, 1, 2, 4] and data["control_seed"] == 1
    rho = np.array(data["rho_pooled"], dtype=float)
    assert rho.shape == (4, 4) and np.allclose(np.diag(rho), 1.0)  # own gates: f_G = f
    assert len(data["sites"]) == 18  # resnet18: 17 ReLU calls, 1 max-pool
    with pytest.raises(PipelineError, match="model.name=resnet18"):
        run(compose_config(*study, "model.name=resnet34", f"output_dir={tmp_path / 'other'}"))
