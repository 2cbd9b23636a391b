"""Images keep their value range in every PIL mode (against an independent numpy reference per mode), through
the paper's preprocessing, image folders (EXIF orientation) and the explorer's upload path."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from excitation_pullbacks.app import images as app_images
from excitation_pullbacks.images import ImageError, image_tensor, open_image
from excitation_pullbacks.pipeline.data import FolderDataset, build_transform

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
