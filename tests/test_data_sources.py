"""The real data and weights sources on local replicas of what they serve: the Hub's parquet export of
frgfm/imagenette, torchvision's extracted Imagenette folders, torch.hub's weights cache; and the one-line errors
when a download is impossible (a dead proxy or endpoint stands in for a machine without network)."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision.models as tvm
from omegaconf import OmegaConf
from PIL import Image

from excitation_pullbacks import ImageNetInput, build_model
from excitation_pullbacks.images import image_tensor
from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.classes import IMAGENETTE, IMAGENETTE_WNIDS
from excitation_pullbacks.pipeline.data import build_dataset
from excitation_pullbacks.pipeline.run import run

from helpers import (
    IMAGENETTE_NAMES,
    assert_nothing_written,
    assert_one_error_line,
    cli,
    cli_in_process,
    imagenette_photos,
    tiny_cfg,
)

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
SMALL = ["data.resize=32", "data.crop=32"]


@pytest.fixture
def no_network(monkeypatch):
    """urllib (torch.hub, torchvision downloads) goes through a proxy that refuses every connection."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, DEAD)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _pixels(jpeg: bytes, size: int = 32) -> torch.Tensor:
    return image_tensor(Image.open(io.BytesIO(jpeg)), resize=size, crop=size)


# --- Hugging Face: frgfm/imagenette's parquet export ------------------------------------------------------


def _write_hf_replica(repo, layout: str, names=IMAGENETTE_NAMES) -> dict:
    """The Hub's parquet files of frgfm/imagenette under ``repo``: {(size, split): labels}.

    export (revision refs/convert/parquet): <size>/<split>/0000.parquet, no dataset card.
    converted (a repository converted to parquet): <size>/<split>-00000-of-00001.parquet and a card whose
    configs name each size.
    Rows as frgfm's builder wrote them: image = {bytes of the archive's JPEG, path in the archive}, label a
    ClassLabel with frgfm's names.
    """
    import datasets

    photos = imagenette_photos()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    parts = {
        ("160px", "validation"): [4, 0, 9, 1, 2, 3, 5, 6, 7, 8],
        ("160px", "train"): [1, 2],
        ("320px", "validation"): [3, 3, 3],
    }
    for (size, split), labels in parts.items():
        folder = "val" if split == "validation" else split
        rows = {
            "image": [
                {"bytes": photos[y], "path": f"imagenette2-{size[:-2]}/{folder}/{IMAGENETTE_WNIDS[y]}/{i:05d}.JPEG"}
                for i, y in enumerate(labels)
            ],
            "label": labels,
        }
        if layout == "export":
            file = repo / size / split / "0000.parquet"
        else:
            file = repo / size / f"{split}-00000-of-00001.parquet"
        file.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(file)
    if layout == "converted":
        configs = "".join(
            f"- config_name: {size}\n  data_files:\n"
            + "".join(f"  - split: {split}\n    path: {size}/{split}-*\n" for split in ("train", "validation"))
            for size in ("160px", "320px")
        )
        (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# Imagenette\n")
    return parts


@pytest.mark.parametrize("layout", ["export", "converted"])
def test_hf_imagenette_replica_of_the_hubs_parquet(tmp_path, layout):
    repo = tmp_path / "frgfm" / "imagenette"
    parts = _write_hf_replica(repo, layout)
    cfg = tiny_cfg(tmp_path, "data=imagenette_hf", f"data.path={repo}", f"data.cache_dir={tmp_path / 'c'}", *SMALL)
    ds = build_dataset(cfg.data, [0, 497])
    assert ds.base.features["label"].names == IMAGENETTE_NAMES  # the schema survived the parquet round trip
    expected = [IMAGENETTE[y] for y in parts[("160px", "validation")]]  # only the 160px validation rows
    assert ds.labels == expected == [497, 0, 701, 217, 482, 491, 566, 569, 571, 574]
    photos = imagenette_photos()
    for i, y in enumerate(parts[("160px", "validation")]):
        x, label = ds[i]
        assert label == IMAGENETTE[y]
        assert torch.equal(x, _pixels(photos[y]))  # the JPEG bytes themselves, decoded as a file would be
    other = build_dataset(OmegaConf.merge(cfg.data, {"size": "320px"}), [0])
    assert other.labels == [491, 491, 491]


def test_hf_labels_follow_the_class_label_names(tmp_path):
    """Labels map by the ClassLabel's names, so another order of the same classes still lands right."""
    repo = tmp_path / "imagenette"
    _write_hf_replica(repo, "export", names=IMAGENETTE_NAMES[::-1])
    cfg = tiny_cfg(tmp_path, "data=imagenette_hf", f"data.path={repo}", f"data.cache_dir={tmp_path / 'c'}", *SMALL)
    assert build_dataset(cfg.data, [0]).labels == [IMAGENETTE[9 - y] for y in [4, 0, 9, 1, 2, 3, 5, 6, 7, 8]]


def test_hf_unknown_label_names_are_refused(tmp_path):
    repo = tmp_path / "imagenette"
    _write_hf_replica(repo, "export", names=[*IMAGENETTE_NAMES[:9], "unicorn"])
    cfg = tiny_cfg(tmp_path, "data=imagenette_hf", f"data.path={repo}", f"data.cache_dir={tmp_path / 'c'}", *SMALL)
    with pytest.raises(PipelineError, match="a label is not an ImageNet class.*unicorn"):
        build_dataset(cfg.data, [0])


def test_hf_offline_without_a_cache_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    cfg = tiny_cfg(tmp_path, "data=imagenette_hf", f"data.cache_dir={tmp_path / 'c'}", *SMALL)
    with pytest.raises(PipelineError) as err:
        build_dataset(cfg.data, [0])
    msg = str(err.value)
    assert f"frgfm/imagenette (160px, validation, revision {cfg.data.revision})" in msg
    assert "HF_HUB_OFFLINE" in msg and "data.path=<that folder>" in msg and "data=folder" in msg


def test_hf_unreachable_hub_fails_at_the_first_request(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", DEAD)  # as HF_ENDPOINT at import
    cfg = tiny_cfg(tmp_path, "data=imagenette_hf", f"data.cache_dir={tmp_path / 'c'}", *SMALL)
    with pytest.raises(PipelineError, match="Hub is unreachable .* data.path=<that folder>.* data=folder"):
        build_dataset(cfg.data, [0])
    assert not (tmp_path / "c").exists()


@pytest.mark.slow  # a subprocess: HF_ENDPOINT is read at import
def test_hf_unreachable_hub_is_one_error_line(tmp_path):
    proc = cli(
        tmp_path,
        "data=imagenette_hf",
        *SMALL,
        f"output_dir={tmp_path / 'out'}",
        env={"HF_ENDPOINT": DEAD, "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_error_line(proc.returncode, proc.stderr, "frgfm/imagenette", "unreachable", "data.path=")
    assert_nothing_written(tmp_path / "out")


# --- torchvision: the extracted archive imagenette2-<size>/<split>/<wnid>/*.JPEG ----------------------------


def _write_tv_replica(root, size: str = "160px", wnids=IMAGENETTE_WNIDS) -> None:
    """Photos where torchvision's Imagenette finds the extracted archive: val as ILSVRC2012_val_*.JPEG, train
    as <wnid>_*.JPEG (the archive's names)."""
    photos = imagenette_photos()
    base = root / f"imagenette2-{size[:-2]}"
    for wnid in wnids:
        y = IMAGENETTE_WNIDS.index(wnid)
        for split, name in [("val", f"ILSVRC2012_val_{y:08d}.JPEG"), ("train", f"{wnid}_{y}.JPEG")]:
            (base / split / wnid).mkdir(parents=True, exist_ok=True)
            (base / split / wnid / name).write_bytes(photos[y])


def test_torchvision_imagenette_replica_runs_a_job(tmp_path, no_network):
    """A whole run on the extracted archive (download=true finds it and downloads nothing): the selected
    images are the photos of the target classes, labelled with their ImageNet classes."""
    _write_tv_replica(tmp_path / "tv")
    cfg = tiny_cfg(
        tmp_path / "out",
        "data=imagenette_tv",
        f"data.root={tmp_path / 'tv'}",
        "data.download=true",
        *SMALL,
        "targets.rows=[parachute,tench,English_springer]",
        "figures=[fig2]",
        "ascent=none",
    )
    t = torch.load(run(cfg)["results"] / "tensors.pt", weights_only=True)
    assert t["label"].tolist() == [701, 0, 217]
    photos = imagenette_photos()
    for r, y in enumerate([9, 0, 1]):
        assert torch.equal(t["images"][r], _pixels(photos[y]))


def test_torchvision_labels_follow_folder_names_not_positions(tmp_path):
    """torchvision numbers the wnid folders present; a partial extraction still maps each to its class."""
    _write_tv_replica(tmp_path, wnids=["n01440764", "n03028079", "n03888257"])
    cfg = tiny_cfg(tmp_path / "out", "data=imagenette_tv", f"data.root={tmp_path}", "data.download=false", *SMALL)
    ds = build_dataset(cfg.data, [0])
    assert ds.base.wnids == ["n01440764", "n03028079", "n03888257"]
    assert ds.labels == [0, 497, 701]
    assert [ds[i][1] for i in range(3)] == [0, 497, 701]


def test_torchvision_split_and_size_pick_their_folder(tmp_path):
    _write_tv_replica(tmp_path, size="320px", wnids=["n03000684"])
    _write_tv_replica(tmp_path, size="160px", wnids=["n03445777"])
    for size, split, label in [("320px", "val", 491), ("160px", "train", 574)]:
        cfg = tiny_cfg(
            tmp_path / "out",
            "data=imagenette_tv",
            f"data.root={tmp_path}",
            f"data.size={size}",
            f"data.split={split}",
            "data.download=false",
        )
        assert build_dataset(cfg.data, [0]).labels == [label]


def test_torchvision_download_without_network_fails_at_once(tmp_path, no_network):
    cfg = tiny_cfg(tmp_path / "out", "data=imagenette_tv", f"data.root={tmp_path / 'tv'}", "data.download=true")
    with pytest.raises(PipelineError) as err:
        build_dataset(cfg.data, [0])
    msg = str(err.value)
    assert msg.startswith("cannot download torchvision Imagenette (160px, val)")
    assert "imagenette2-160.tgz" in msg and "imagenette2-160/val/<wnid>/*.JPEG" in msg and "data=folder" in msg
    assert not (tmp_path / "tv").exists()  # nothing made on the way


# --- weights: torch.hub's cache file of a torchvision weights enum -------------------------------------------


def _seeded_resnet18_state() -> dict:
    torch.manual_seed(5)
    net = tvm.resnet18()
    for m in net.modules():  # non-default BN statistics, so that a default init could not pass for them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


def test_cached_weights_load_through_torchvision_and_run(tmp_path, monkeypatch, no_network):
    """IMAGENET1K_V1 read by torchvision's own loading from $TORCH_HOME/hub/checkpoints/<the enum url's file>:
    the parameters are the file's, and a run's logits agree with that state dict loaded by hand."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    assert url.endswith("/resnet18-f37072fd.pth")
    state = _seeded_resnet18_state()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")

    loaded = build_model("resnet18", "IMAGENET1K_V1", wrap=False).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    cfg = tiny_cfg(tmp_path / "out", "model.weights=IMAGENET1K_V1", "figures=[fig2]", "ascent=none")
    t = torch.load(run(cfg)["results"] / "tensors.pt", weights_only=True)
    reference = tvm.resnet18()
    reference.load_state_dict(state)
    with torch.no_grad():
        logits = ImageNetInput(reference).eval()(t["images"])
    torch.testing.assert_close(t["logit_before"], logits.gather(1, t["columns"].expand(len(logits), -1)))


def test_missing_weights_without_network_name_the_file(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, "model.weights=IMAGENET1K_V1", f"output_dir={tmp_path / 'out'}"
    )
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert_one_error_line(code, err, "resnet18-f37072fd.pth", f"in {folder} ", "cannot download", "weights=null")
    assert_nothing_written(tmp_path / "out")
    assert not (tmp_path / "torch").exists()
