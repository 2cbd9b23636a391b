"""Every failure is one error line with nothing half-written: bad checkpoints, images over the pixel limit, a
missing accelerator, run folders that are files, full or read-only disks, out of memory, bad overrides and
image folders."""

from __future__ import annotations

import errno
import io
import struct
import zlib
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.modules import pullbacks as pullback_module
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.tasks import figures

from helpers import FAST, assert_nothing_written, assert_one_error_line, cli_in_process, tiny_cfg


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb's shape) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    good = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), good)
    (d / "truncated.pt").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (d / "corrupt.pt").write_bytes(b"\x80\x02garbage" * 50)
    (d / "empty.pt").write_bytes(b"")
    torch.save([torch.zeros(2)], d / "list.pt")
    torch.save(nn.Linear(2, 2), d / "object.pt")
    torch.save(torchvision.models.resnet34().state_dict(), d / "resnet34.pt")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "ten_classes.pt")
    return d


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("truncated.pt", ["corrupt, truncated"]),
        ("corrupt.pt", ["corrupt"]),
        ("empty.pt", ["corrupt, truncated"]),
        ("list.pt", ["does not hold a state dict"]),
        ("object.pt", ["Python objects", "state_dict()"]),
        ("resnet34.pt", ["does not fit", "unexpected (layer1.2"]),
        ("ten_classes.pt", ["does not fit", "fc.bias (10,) in the file, (1000,) in the model"]),
    ],
)
def test_every_checkpoint_problem_is_one_line(tmp_path, monkeypatch, capsys, checkpoints, name, fragments):
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, f"model.checkpoint={checkpoints / name}", f"output_dir={tmp_path / 'out'}"
    )
    assert_one_error_line(code, err, *fragments)
    assert "weights_only=False" not in err
    assert_nothing_written(tmp_path / "out")


def test_images_over_the_pixel_limit(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "0_tench.png")
    Image.new("RGB", (40, 40)).save(folder / "1_church.png")
    common = ("data=folder", f"data.root={folder}", f"output_dir={tmp_path / 'out'}")
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, *common, "data.max_pixels=1000")
    assert_one_error_line(code, err, "40 x 40 = 1600 pixels", "limit of 1000", "data.max_pixels=")
    _png_header_only(folder / "1_church.png", 30000, 30000)  # over PIL's own bomb limit
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, *common)
    assert_one_error_line(code, err, "1_church.png is too large", "data.max_pixels=")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_unavailable_accelerator(tmp_path, monkeypatch, capsys):
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, "trainer=gpu", f"output_dir={tmp_path / 'out'}")
    assert_one_error_line(code, err, "needs a CUDA GPU", "CPU only", "trainer=cpu")
    assert_nothing_written(tmp_path / "out")


def test_run_directories_that_are_files(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, f"output_dir={blocker}")
    assert_one_error_line(code, err, "is a file, not a folder")
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, f"hydra.run.dir={blocker / 'run'}")
    assert_one_error_line(code, err, "hydra.run.dir", f"{blocker} is a file")
    assert blocker.read_text() == ""


def _write_to_full_disk(obj, path):
    with open("/dev/full", "wb") as f:  # the kernel answers ENOSPC, as a full disk does
        torch.save(obj, f)


@pytest.mark.parametrize(
    "where, failure, fragments",
    [
        ("save_tensors", _write_to_full_disk, ["no space left on the device", "nothing was published"]),
        ("save_tensors", OSError(errno.EROFS, "Read-only file system", "tensors.pt"), ["read-only"]),
        ("pullback", lambda *a, **k: torch.empty(2**40), ["out of memory on the CPU", "batch_size (now 5)"]),
        (
            "pullback",
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
            ["on the GPU", "batch_size"],
        ),
    ],
)
def test_disk_and_memory_failures_are_one_line(tmp_path, monkeypatch, capsys, where, failure, fragments):
    if not Path("/dev/full").exists() and failure is _write_to_full_disk:
        pytest.skip("no /dev/full")

    def fail(*args, **kwargs):
        if isinstance(failure, BaseException):
            raise failure
        return failure(*args, **kwargs)

    monkeypatch.setattr(figures if where == "save_tensors" else pullback_module, where, fail)
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, *FAST, f"output_dir={tmp_path / 'out'}")
    assert_one_error_line(code, err, *fragments)
    assert_nothing_written(tmp_path / "out")


def test_debug_gives_the_traceback(tmp_path, monkeypatch, capsys):
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, "trainer=gpu", "trainer.devices=64", "debug=true")
    assert code == 1 and "Traceback" in err and "PipelineError" in err


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.name=resnet_nope"], "unknown model 'resnet_nope'"),
        (["targets.rows=[tench,nosuchclass]"], "unknown ImageNet class name 'nosuchclass'"),
        (["batch_size=0"], "batch_size must be >= 1"),
        (["temperatures=[-1]"], "temperatures must be"),
        (["on_conflict=maybe"], "on_conflict must be one of error, beside"),
        (["data=folder", "data.root=/nonexistent/imgs"], "does not exist"),
    ],
)
def test_bad_inputs_keep_failing_cleanly(tmp_path, monkeypatch, capsys, overrides, fragment):
    code, _, err = cli_in_process(monkeypatch, capsys, tmp_path, *overrides, f"output_dir={tmp_path / 'out'}")
    assert_one_error_line(code, err, fragment)
    assert_nothing_written(tmp_path / "out")


def test_bad_image_folders_keep_failing_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no images"):
        run(tiny_cfg(tmp_path / "out", "data=folder", f"data.root={tmp_path / 'empty'}"))
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.jpg")
    (bad / "0_tench.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])  # truncated
    (bad / "1_church.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match=r"cannot read image .*\.jpg"):
        run(tiny_cfg(tmp_path / "out", "data=folder", f"data.root={bad}"))
    assert_nothing_written(tmp_path / "out")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(PipelineError, match="is a file|not writable"):
        run(tiny_cfg(blocker / "sub", *FAST))
