"""Trustworthy runs: results belong to the config that asked for them (manifest, conflicts, re-runs), runs stop
cleanly on SIGINT/SIGTERM, every failure is one error line with nothing half-written, images keep their value
range in every PIL mode, and the core never changes the user's model."""

from __future__ import annotations

import colorsys
import copy
import errno
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from excitation_pullbacks import ascent, pullback
from excitation_pullbacks.app import images as app_images
from excitation_pullbacks.attribution import ExcitationPullback
from excitation_pullbacks.baselines import explainer
from excitation_pullbacks.images import ImageError, image_tensor, open_image
from excitation_pullbacks.metrics import ascent_scores, deletion, insertion
from excitation_pullbacks.pipeline import PipelineError
from excitation_pullbacks.pipeline.data import FolderDataset, build_transform
from excitation_pullbacks.pipeline.modules import pullbacks as pullback_module
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.tasks import figures
from excitation_pullbacks.stopping import Stopped

from helpers import (
    CLI,
    assert_model_unchanged,
    assert_nothing_written,
    assert_one_error_line,
    cli_in_process,
    model_state,
    tiny_cfg,
    tiny_overrides,
)

FAST = ("experiment=fig2", "logger=none")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (computed here, not by the package)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------------------
# 1. Run identity and the manifest


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    final = run(tiny_cfg(tmp_path, *FAST))["results"]
    manifest = json.loads((final / "manifest.json").read_text())
    files = digests(final)
    del files["manifest.json"]
    assert manifest["complete"] is True and set(manifest["files"]) == set(files)
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == files[name] and entry["size"] == (final / name).stat().st_size
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["started"] <= manifest["finished"]
    ident = manifest["identity"]
    assert ident["gate"]["temperature"] == 0.3 and "output_dir" not in ident and "logger" not in ident
    assert "trainer" not in ident and "name" not in ident and "skip_complete" not in ident


def test_another_config_is_refused_or_written_beside(tmp_path, capsys):
    first = run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.3"))["results"]
    before = digests(first)
    with pytest.raises(PipelineError, match=r"another config \(gate\.temperature: 0\.3 -> 0\.5.*on_conflict=beside"):
        run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.5"))
    assert digests(first) == before and not (tmp_path / ".results.partial").exists()

    beside = run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.5", "on_conflict=beside"))
    assert "writing beside it in" in capsys.readouterr().out
    assert beside["results"] != first and beside["results"].name.startswith("results-")
    assert digests(first) == before  # the first results untouched
    t = torch.load(beside["results"] / "tensors.pt", weights_only=True)
    assert t["temperatures"] == ["0.5"]
    again = run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.5", "on_conflict=beside"))
    assert again["skipped"] and again["results"] == beside["results"]
    assert run(tiny_cfg(tmp_path, *FAST, "gate.temperature=0.3"))["skipped"]


def test_rerun_keeps_user_files_and_redoes_damaged_results(tmp_path, capsys):
    first = run(tiny_cfg(tmp_path, *FAST))["results"]
    # keys that do not change results: still complete
    assert run(tiny_cfg(tmp_path, *FAST[:1], "logger=csv", "name=renamed", "trainer.devices=1"))["skipped"]
    (first / "notes.txt").write_text("mine")
    (first / "mine").mkdir()
    (first / "mine" / "plot.png").write_bytes(b"user data")
    old = json.loads((first / "manifest.json").read_text())

    rerun = run(tiny_cfg(tmp_path, *FAST, "skip_complete=false"))
    assert not rerun["skipped"] and sorted(rerun["kept"]) == ["mine/plot.png", "notes.txt"]
    assert "kept 2 file(s)" in capsys.readouterr().out
    assert (first / "notes.txt").read_text() == "mine" and (first / "mine" / "plot.png").read_bytes() == b"user data"
    new = json.loads((first / "manifest.json").read_text())
    assert new["finished"] >= old["finished"] and "notes.txt" not in new["files"]
    assert not list(tmp_path.glob(".*.partial"))

    (first / "tensors.pt").write_bytes(b"damaged")  # a listed file changed: no longer complete
    again = run(tiny_cfg(tmp_path, *FAST))
    assert not again["skipped"] and torch.load(first / "tensors.pt", weights_only=True)["temperatures"] == ["0.3"]
    assert (first / "notes.txt").read_text() == "mine"


def test_a_results_folder_without_manifest_is_not_complete(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mine.txt").write_text("x")
    result = run(tiny_cfg(tmp_path, *FAST))
    assert not result["skipped"] and (tmp_path / "results" / "fig2.png").is_file()
    assert (tmp_path / "results" / "mine.txt").read_text() == "x"


def test_files_no_manifest_lists_are_never_overwritten(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "config.yaml").write_text("the user's")
    with pytest.raises(PipelineError, match="no manifest lists .* config.yaml"):
        run(tiny_cfg(tmp_path, *FAST))
    assert (tmp_path / "results" / "config.yaml").read_text() == "the user's"
    assert not (tmp_path / ".results.partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Signals


@pytest.mark.slow
def test_sigterm_stops_a_cli_job_and_the_rerun_completes(tmp_path):
    out = tmp_path / "out"
    args = [*CLI, *tiny_overrides("experiment=fig3_fig4", "ascent.steps=12", "logger=none", f"output_dir={out}")]
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # Hydra's log: the job is inside the ascent loop
        if "ascent steps along excitation" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM") and "run the same command" in err
    assert_nothing_written(out)
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert (out / "results" / "manifest.json").is_file()


def test_sigint_stops_an_in_process_run_and_restores_handlers(tmp_path, monkeypatch, capsys):
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    staging = tmp_path / "out" / ".results.partial"

    def interrupt_when_running():
        deadline = time.monotonic() + 60
        while not staging.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    code, _, err = cli_in_process(
        monkeypatch, capsys, tmp_path, "experiment=fig3_fig4", "ascent.steps=200", f"output_dir={tmp_path / 'out'}"
    )
    assert code == 130
    assert_one_error_line(code, err, "stopped by SIGINT", "run the same command again")
    assert_nothing_written(tmp_path / "out")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous


def test_core_loops_stop_on_request_and_leave_the_model(tiny_net):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    before = model_state(tiny_net)
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Stopped):
        ascent(tiny_net, x, [0, 1], steps=50, should_stop=stop_after_three)
    assert len(calls) == 4
    assert_model_unchanged(tiny_net, before)
    with pytest.raises(Stopped):
        deletion(tiny_net, x, x, [0, 1], steps=8, batch_size=2, should_stop=lambda: True)


# ---------------------------------------------------------------------------------------------------------------
# 3. Every failure is one error line, nothing half-written


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


# ---------------------------------------------------------------------------------------------------------------
# 4. Faithful image conversion: an independent numpy reference per mode


RNG = np.random.default_rng(7)
H, W = 12, 10
BYTES3 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return colour / 255.0 * a + (1 - a)


def _lab_reference(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D50) -> sRGB, written from the CIE and sRGB definitions (Bradford adaptation to D65)."""
    L, a, b = lab[..., 0] / 2.55, lab[..., 1] - 128.0, lab[..., 2] - 128.0
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def inv(f):
        return np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))

    xyz50 = np.stack([inv(fx) * 0.96422, inv(fy), inv(fz) * 0.82521], -1)
    ma = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    d50, d65 = ma @ [0.96422, 1.0, 0.82521], ma @ [0.95047, 1.0, 1.08883]
    adapt = np.linalg.inv(ma) @ np.diag(d65 / d50) @ ma
    m = np.array(
        [[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]]
    )
    lin = np.clip(xyz50 @ adapt.T @ m.T, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.power(lin, 1 / 2.4) - 0.055)


def _case(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image of ``mode`` and its reference RGB in [0, 1] (H, W, 3)."""
    grey = BYTES3[..., 0]
    if mode == "1":
        bits = grey > 127
        return Image.fromarray(bits), np.repeat(bits[..., None], 3, -1).astype(float)
    if mode == "L":
        return Image.fromarray(grey), np.repeat(grey[..., None], 3, -1) / 255.0
    if mode == "LA":
        im = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(ALPHA)])
        return im, np.repeat(_over_white(grey[..., None].astype(float), ALPHA), 3, -1)
    if mode in ("P", "PA"):
        palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
        im = Image.frombytes("P", (W, H), grey.tobytes())
        im.putpalette(palette.tobytes())
        ref = palette[grey] / 255.0
        if mode == "PA":
            im = im.convert("PA")
            im.putalpha(Image.fromarray(ALPHA))
            ref = _over_white(palette[grey].astype(float), ALPHA)
        return im, ref
    if mode == "RGB":
        return Image.fromarray(BYTES3), BYTES3 / 255.0
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([BYTES3, ALPHA]))
        return im, _over_white(BYTES3.astype(float), ALPHA)
    if mode == "CMYK":
        cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
        im = Image.frombytes("CMYK", (W, H), cmyk.tobytes())
        c = cmyk / 255.0
        return im, (1 - c[..., :3]) * (1 - c[..., 3:])
    if mode == "YCbCr":
        im = Image.frombytes("YCbCr", (W, H), BYTES3.tobytes())
        y, cb, cr = (BYTES3[..., i].astype(float) for i in range(3))  # JFIF's conversion, 0..255
        rgb = np.stack(
            [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1
        )
        return im, np.clip(rgb / 255.0, 0, 1)
    if mode == "LAB":
        lab = BYTES3.copy()
        lab[..., 1:] = RNG.integers(100, 156, (H, W, 2))  # mostly inside the sRGB gamut
        return Image.frombytes("LAB", (W, H), lab.tobytes()), _lab_reference(lab.astype(float))
    if mode == "HSV":
        im = Image.frombytes("HSV", (W, H), BYTES3.tobytes())
        ref = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in BYTES3.astype(float)])
        return im, ref
    if mode.startswith("I;16"):
        v = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
        dtype = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombytes(mode, (W, H), v.astype(dtype).tobytes())
        return im, np.repeat(v[..., None], 3, -1) / 65535.0
    if mode == "I":
        v = RNG.integers(-5000, 70000, (H, W)).astype(np.int32)
        ref = (v - v.min()) / (v.max() - v.min())  # beyond 0..255: the image's own min..max
        return Image.fromarray(v), np.repeat(ref[..., None], 3, -1)
    if mode == "I8":  # 32-bit integers holding 8-bit values
        v = grey.astype(np.int32)
        return Image.fromarray(v), np.repeat(v[..., None], 3, -1) / 255.0
    if mode == "F":
        v = RNG.random((H, W)).astype(np.float32)
        return Image.fromarray(v), np.repeat(v[..., None], 3, -1).astype(float)
    if mode == "F255":
        v = (RNG.random((H, W)) * 255).astype(np.float32)
        return Image.fromarray(v), np.repeat(v[..., None], 3, -1) / 255.0
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"]
MODES += ["I;16", "I;16L", "I;16B", "I;16N", "I", "I8", "F", "F255"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_converts_by_its_value_range(mode):
    im, ref = _case(mode)
    assert im.mode == {"I8": "I", "F255": "F"}.get(mode, mode)
    x = image_tensor(im)
    assert x.shape == (3, H, W) and x.dtype == torch.float32
    expected = torch.from_numpy(ref).permute(2, 0, 1).float() * 2 - 1
    torch.testing.assert_close(x, expected, atol=1 / 255, rtol=0)


def test_rgb_images_go_through_the_papers_preprocessing_unchanged():
    im = Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    paper = torchvision.transforms.Compose(
        [torchvision.transforms.Resize(24), torchvision.transforms.CenterCrop(20), torchvision.transforms.ToTensor()]
    )
    assert torch.equal(build_transform(24, 20)(im), paper(im) * 2 - 1)


def test_folder_images_keep_their_range_and_orientation(tmp_path):
    ramp = (np.linspace(0, 65535, 16 * 24).reshape(16, 24)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "0_tench.png")
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "1_church.tif")
    rotated = Image.fromarray(BYTES3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "2_ostrich.png", exif=exif)
    ds = FolderDataset(tmp_path, image_tensor, space="imagenet")  # no resizing: pixels compare one to one
    for i in (0, 1):  # 16-bit and float: the ramp from black to white, not white (clipped) or black
        x, _ = ds[i]
        assert x.min() == pytest.approx(-1, abs=1e-6) and x.max() == pytest.approx(1, abs=1e-6)
        torch.testing.assert_close(x[0], torch.from_numpy(ramp / 65535.0).float() * 2 - 1, atol=1 / 255, rtol=0)
    x, _ = ds[2]
    upright = np.rot90(BYTES3, k=-1) / 255.0  # shown as the camera saw it
    torch.testing.assert_close(x, torch.from_numpy(upright.copy()).permute(2, 0, 1).float() * 2 - 1)


def test_the_explorer_reads_images_as_the_pipeline_does(tmp_path):
    Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)).save(tmp_path / "a.png")
    ours = build_transform(32, 32)(open_image(tmp_path / "a.png"))
    app = app_images.preprocess(app_images.open_image(tmp_path / "a.png"), 32, 32)[0]
    torch.testing.assert_close(app, ours, atol=1 / 255, rtol=0)
    with pytest.raises(ImageError, match="NaN"):
        image_tensor(Image.fromarray(np.full((4, 4), np.nan, np.float32)))


# ---------------------------------------------------------------------------------------------------------------
# 5. The model is never changed


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=None),  # cumulative average: also counts batches
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[0].weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    return net


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nothing_changes_the_model(tiny_net, mode):
    tiny_net.train(mode == "train")
    tiny_net[2].training = mode != "train"  # a flag out of line with the rest stays out of line
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 1, 2, 0])
    before = model_state(tiny_net)
    with pytest.warns(UserWarning, match="training mode") if mode == "train" else warnings.catch_warnings():
        if mode == "eval":
            warnings.simplefilter("error")  # no warning in eval mode
        pullback(tiny_net, x, t)
    ascent(tiny_net, x, t, steps=3, step_size=1.0, eps=5.0)
    deletion(tiny_net, x, x, t, steps=4)
    insertion(tiny_net, x, x, t, steps=4)
    ascent_scores(tiny_net, x, x.flip(0), t)
    ExcitationPullback(tiny_net).attribute(x, target=t)
    for method in ("vanilla", "smoothgrad", "integrated_gradients"):
        explainer(method, smoothgrad_samples=2, ig_steps=2)(tiny_net, x, t)
    assert_model_unchanged(tiny_net, before)


def test_train_mode_uses_batch_statistics(tiny_net):
    """The forward pass is the model's own: in train mode BatchNorm normalises with the batch's statistics, so
    the vanilla pullback (T = 0) is the input gradient of the train-mode model."""
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 1, 2, 0])
    tiny_net.train()
    with pytest.warns(UserWarning, match="training mode"):
        got = pullback(tiny_net, x, t, temperature=0)
    reference = copy.deepcopy(tiny_net).train()
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(xr).gather(1, t[:, None]).sum(), xr)
    torch.testing.assert_close(got, expected)
    tiny_net.eval()
    assert not torch.allclose(pullback(tiny_net, x, t, temperature=0), got)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
