"""The command line: bad input gives one clear error line and writes nothing; multirun; W&B offline; DDP."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from excitation_pullbacks.pipeline import PipelineError, plots
from excitation_pullbacks.pipeline.run import run

from helpers import DDP_SPAWN, assert_nothing_written, assert_one_error_line, cli, cli_in_process, tiny_cfg


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["model.name=resnet_nope"], "unknown model 'resnet_nope'"),
        (["targets.rows=[tench,nosuchclass]"], "unknown ImageNet class name 'nosuchclass'"),
        (["targets.extra=[1000]"], "class index 1000 is out of range"),
        (["figures=[fig9]"], r"unknown figure\(s\) fig9"),
        (["figures=[fig3]", "ascent=none"], "fig3/fig4 need ascent steps > 0"),
        (["temperatures=[-1]"], "temperatures must be"),
    ],
)
def test_bad_config_values(tmp_path, overrides, error):
    with pytest.raises((PipelineError, ValueError), match=error):
        run(tiny_cfg(tmp_path, *overrides))
    assert_nothing_written(tmp_path)


@pytest.mark.slow  # a subprocess: the console script itself / environment read at import
def test_console_script_prints_one_error_line(tmp_path):
    proc = cli(tmp_path, "model.name=resnet_nope", f"output_dir={tmp_path / 'out'}")
    assert_one_error_line(proc.returncode, proc.stderr, "unknown model 'resnet_nope'")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("data=folder",), "data.root"),
        (("no_such_key=1",), "Could not override 'no_such_key'"),
        (("gate=nosuchgate",), "Could not find 'gate/nosuchgate'"),
        (("-m", "gate.temperature=0.1,0.2", "gate=sigmoid,nosuchgate"), "Could not find 'gate/nosuchgate'"),
        (("gate.temperature=warm",), "gate.temperature"),
        (("gate.kind=per_pixel",), "gate.kind"),
        (("gate.shape=sigmiod",), "gate.shape"),
        (("ascent.steps=many",), "ascent.steps"),
        (("gate.temperature=0.5", "temperatures=[0.3]", "figures=[fig2]"), "gate.temperature=0.5 is not one of"),
    ],
)
def test_bad_command_lines_fail_before_running(tmp_path, monkeypatch, capsys, args, fragment):
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, *args, f"output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert_one_error_line(code, err, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()


def test_empty_and_missing_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    for root, error in [("empty", "holds no images"), ("nope", "does not exist")]:
        with pytest.raises(PipelineError, match=error):
            run(tiny_cfg(tmp_path / "out", "data=folder", f"data.root={tmp_path / root}"))
    assert_nothing_written(tmp_path / "out")


def test_corrupt_image_and_unknown_class_in_file_name(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0_tench.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "imgs" / "1_church.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"cannot read image .*_(tench|church)\.jpg: not an image"):
        run(tiny_cfg(tmp_path / "out", "data=folder", f"data.root={tmp_path / 'imgs'}"))
    assert_nothing_written(tmp_path / "out")
    (tmp_path / "imgs" / "2_unicorn.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match="cannot tell the class of .*2_unicorn.jpg"):
        run(tiny_cfg(tmp_path / "out", "data=folder", f"data.root={tmp_path / 'imgs'}"))


def test_unwritable_output_dir(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, f"output_dir={blocker / 'sub'}")
    assert_one_error_line(code, err, "not writable")


@pytest.mark.slow  # a subprocess: the console script itself / environment read at import
def test_offline_hf_dataset_fails_with_a_hint(tmp_path):
    proc = cli(
        tmp_path,
        "data=imagenette_hf",
        "data.resize=32",
        "data.crop=32",
        f"output_dir={tmp_path / 'out'}",
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    assert_one_error_line(proc.returncode, proc.stderr, "frgfm/imagenette", "data=folder", "data.path=<that folder>")
    assert_nothing_written(tmp_path / "out")


def test_torchvision_imagenette_missing(tmp_path):
    with pytest.raises(PipelineError, match="cannot load torchvision Imagenette .* data=folder"):
        run(
            tiny_cfg(
                tmp_path,
                "data=imagenette_tv",
                "data.download=false",
                f"data.root={tmp_path / 'tv'}",
                "data.resize=32",
                "data.crop=32",
            )
        )
    assert_nothing_written(tmp_path)


def test_multirun_job_folders_stay_flat_for_path_overrides(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    for i, name in enumerate(["tench", "church"]):
        Image.new("RGB", (40, 36), (60 * i, 120, 200)).save(photos / f"{i}_{name}.png")
    sweep = tmp_path / "sweep"
    code, _, err = cli_in_process(
        monkeypatch,
        capsys,
        tmp_path,
        "-m",
        "experiment=fig2",
        "logger=none",
        "data=folder",
        f"data.root={photos}",
        "gate.temperature=0.2,0.3",
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 0, err
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((job / "results" / "fig2.png").is_file() for job in jobs)
    assert all(f"data.root={photos.name}~" in job.name and "/" not in job.name for job in jobs)


@pytest.mark.slow  # subprocesses / several processes
def test_multirun_two_temperatures_wandb_offline_and_rerun_skips(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=fig2", "logger=wandb", "gate.temperature=0.2,0.4", f"hydra.sweep.dir={sweep}"]
    proc = cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.name for p in sweep.iterdir() if (p / "results").is_dir())  # sweep/wandb: the overview run
    assert len(runs) == 2 and "gate.temperature=0.2" in runs[0] and "gate.temperature=0.4" in runs[1]
    wandb_runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(wandb_runs) == 2 and all(list(r.glob("*.wandb")) for r in wandb_runs)
    for r in wandb_runs:  # the figure and the metrics table went into the offline run
        assert list(r.glob("files/media/images/figures/fig2_*.png"))
        assert list(r.glob("files/media/table/metrics_*.table.json"))
    assert proc.stdout.count("wandb sync") == 3  # the two jobs and the multirun overview
    assert proc.stdout.count("W&B multirun overview") == 1
    for r, job in zip(wandb_runs, runs):  # each job's run is named after its overrides (group: the experiment)
        assert f"fig2/{job}".encode() in next(r.glob("*.wandb")).read_bytes()
    t = [torch.load(sweep / r / "results" / "tensors.pt", weights_only=True) for r in runs]
    assert t[0]["temperatures"] == ["0.2"] and t[1]["temperatures"] == ["0.4"]
    assert not torch.allclose(t[0]["excitation"], t[1]["excitation"])
    again = cli(tmp_path, *args)
    assert again.returncode == 0 and again.stdout.count("skipping complete run") == 2


@pytest.mark.slow  # subprocesses / several processes
def test_ddp_spawn_two_processes_equals_one(tmp_path):
    common = [
        "experiment=fig3_fig4",
        "ascent.steps=1",
        "data.num_images=9",
        "targets.rows=[tench,church,ostrich]",
        "batch_size=1",
    ]
    one = run(tiny_cfg(tmp_path / "one", *common))["results"]
    two = run(
        tiny_cfg(
            tmp_path / "two",
            *common,
            *DDP_SPAWN,
        )
    )["results"]
    a, b = (torch.load(p / "tensors.pt", weights_only=True) for p in (one, two))
    assert b["row"].tolist() == [0, 1, 2]  # three images split unevenly over two ranks, merged in row order
    for key in ("images", "vanilla", "excitation", "exc_ascent", "van_ascent", "logit_before"):
        torch.testing.assert_close(a[key], b[key], msg=key)


@pytest.mark.slow  # subprocesses / several processes
def test_cli_ddp_two_processes_equals_one(tmp_path):
    common = ["experiment=fig3_fig4", "ascent.steps=1", "targets.rows=[tench,church,ostrich]", "batch_size=1"]
    proc = cli(
        tmp_path,
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"output_dir={tmp_path / 'two'}",
        "logger=none",
    )
    assert proc.returncode == 0, proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    assert proc.stdout.count("results: ") == 1  # only rank 0 reports
    one = run(tiny_cfg(tmp_path / "one", *common))["results"]
    a, b = (torch.load(p / "tensors.pt", weights_only=True) for p in (one, tmp_path / "two" / "results"))
    for key in ("vanilla", "excitation", "exc_ascent", "van_ascent"):
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_multirun_refuses_a_shared_output_dir(tmp_path, monkeypatch, capsys):
    code, _, err = cli_in_process(
        monkeypatch,
        capsys,
        tmp_path,
        "-m",
        "gate.temperature=0.2,0.4",
        f"output_dir={tmp_path / 'out'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert_one_error_line(code, err, "shared by every multirun job")
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_results_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "fig2", broken)
    with pytest.raises(OSError, match="disk full"):
        run(tiny_cfg(tmp_path, "experiment=fig2"))
    assert_nothing_written(tmp_path)
    monkeypatch.undo()
    assert (run(tiny_cfg(tmp_path, "experiment=fig2"))["results"] / "fig2.png").is_file()


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, "model.weights=IMAGENET1K_V1", f"output_dir={tmp_path / 'out'}"
    )
    assert_one_error_line(code, err, "resnet18", "IMAGENET1K_V1", "weights=null")
    assert_nothing_written(tmp_path / "out")
