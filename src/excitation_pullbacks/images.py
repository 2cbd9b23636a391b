"""Image files -> model inputs, faithful to every PIL mode: pixel values are read by the range the mode
stands for, never clipped (PIL's ``convert("RGB")`` turns 16-bit images white and float images black).

The rule, per mode, to RGB in [0, 1] (the model input is then ``2 * v - 1``, in [-1, 1]):

- ``1``, ``L``, ``P``, ``RGB``: 8-bit values / 255 (``1``: 0 or 1); a palette is looked up.
- ``LA``, ``PA``, ``RGBA``, ``P`` with transparency (and premultiplied ``La``, ``RGBa``): composited over
  white, ``v * a + (1 - a)``.
- ``CMYK``: ``(1 - c) * (1 - k)`` per channel (PIL's formula, in floating point).
- ``YCbCr``: JPEG's full-range BT.601 (``r = y + 1.402 (cr - 128 / 255)``, ...), clipped to [0, 1].
- ``LAB``: PIL's encoding (L * 255 / 100, a and b offset by 128), CIE L*a*b* under D50 -> XYZ -> Bradford to
  D65 -> linear sRGB -> sRGB, clipped to [0, 1].
- ``HSV``: the hexcone formula with h, s, v in [0, 1].
- ``I;16`` (every byte order: ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): values / 65535.
- ``I`` (32-bit integers; the bit depth is not recorded): values / 255 when all lie in [0, 255], else scaled
  from the image's min..max to [0, 1] (a constant image gives 0).
- ``F`` (32-bit float): as they are when all lie in [0, 1], / 255 when in [0, 255], else min..max scaled;
  NaN or infinite values are an :class:`ImageError`.

EXIF orientation is applied when a file is opened (:func:`open_image`). ``1``, ``L``, ``P`` without
transparency and ``RGB`` are resized as 8-bit RGB images (torchvision's PIL path, as the paper's
preprocessing); every other mode is resized per channel as 32-bit float PIL images, with the same filter.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import functional as TF

__all__ = ["MAX_PIXELS", "ImageError", "image_tensor", "open_image", "to_rgb", "unit_rgb"]

#: Default largest image (width x height) decoded: PIL's own decompression-bomb limit.
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
#: Modes PIL converts to 8-bit RGB exactly (no value range to interpret, nothing to composite).
EXACT_8BIT = {"1", "L", "RGB"}
_BOMB_LIMIT = threading.Lock()  # PIL's bomb limit is global: raised under this lock only


class ImageError(ValueError):
    """An image that cannot be used; the message is one line meant for the user."""


def open_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS, option: str = "") -> Image.Image:
    """Open an image file -> a loaded PIL image in its own mode (first frame), EXIF orientation applied.

    max_pixels: the largest width x height decoded, checked from the header before decoding (None: no limit);
    ``option`` names the setting that raises it in the message (e.g. ``data.max_pixels``).
    Raises ImageError for a missing file, a file PIL cannot identify, one over the pixel limit and a
    truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist")
    raise_with = f" (raise it with {option}=<pixels>)" if option else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
            with _pil_limit(max_pixels), Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(
                        f"image {path} is too large: {w} x {h} = {w * h} pixels, over the limit of {max_pixels}{raise_with}"
                    )
                im.seek(0)  # first frame of a GIF / multi-page TIFF
                im.load()
                return ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"image {path} is too large (a possible decompression bomb), over the limit of {max_pixels} pixels{raise_with}"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not an image file PIL can identify") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        raise ImageError(f"cannot read image {path}: {' '.join(str(err).split()) or type(err).__name__}") from None


@contextmanager
def _pil_limit(max_pixels: int | None):
    """Lift PIL's global decompression-bomb limit to ``max_pixels`` for the block when that is larger (under
    a lock; restored after), so that only the limit :func:`open_image` checks applies."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is None or (max_pixels is not None and max_pixels <= pil):
        yield
        return
    with _BOMB_LIMIT:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = pil


def _range_scaled(a: np.ndarray, mode: str) -> np.ndarray:
    """One band of a 16-bit, 32-bit integer or float image -> float64 in [0, 1] by the module's rule."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageError(f"the image ({mode}) holds NaN or infinite pixel values")
    if a.size == 0:
        return a
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") and lo >= 0:
        return a / 65535.0
    if mode == "F" and lo >= 0 and hi <= 1:
        return a
    if lo >= 0 and hi <= 255:
        return a / 255.0
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _lab_to_rgb(a: np.ndarray) -> np.ndarray:
    """PIL LAB bytes (H, W, 3) -> sRGB (H, W, 3) in [0, 1] (D50 -> Bradford -> D65)."""
    L, A, B = a[..., 0] * (100 / 255), a[..., 1] - 128.0, a[..., 2] - 128.0
    fy = (L + 16) / 116
    f = np.stack([fy + A / 500, fy, fy - B / 200], -1)
    eps, kappa = 216 / 24389, 24389 / 27
    xyz = np.where(f**3 > eps, f**3, (116 * f - 16) / kappa) * np.array([0.96422, 1.0, 0.82521])
    bradford = np.array(
        [[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077], [0.0122982, -0.0204830, 1.3299098]]
    )
    srgb = np.array(
        [[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]]
    )
    lin = np.clip(xyz @ (srgb @ bradford).T, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def _hsv_to_rgb(a: np.ndarray) -> np.ndarray:
    """HSV (H, W, 3) in [0, 1] -> RGB (H, W, 3) in [0, 1] (the hexcone model)."""
    h, s, v = a[..., 0], a[..., 1], a[..., 2]
    i = np.floor(h * 6) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros_like(a)
    for k, (r, g, b) in enumerate(table):
        sel = i == k
        out[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
    return out


def unit_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB float64 array (H, W, 3) in [0, 1] by the module's rule."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("I", "F") or mode.startswith("I;16"):
        grey = _range_scaled(np.asarray(im), mode)
        return np.repeat(grey[..., None], 3, axis=-1)
    a = np.asarray(im).astype(np.float64)
    if mode == "1":
        return np.repeat(a[..., None], 3, axis=-1)
    a = a / 255.0
    if mode == "L":
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "RGB":
        return a
    if mode in ("LA", "RGBA"):
        colour, alpha = a[..., :-1], a[..., -1:]
        return np.broadcast_to(colour * alpha + (1 - alpha), (*a.shape[:2], 3)).copy()
    if mode in ("La", "RGBa"):  # premultiplied
        colour, alpha = a[..., :-1], a[..., -1:]
        return np.broadcast_to(colour + (1 - alpha), (*a.shape[:2], 3)).copy()
    if mode == "CMYK":
        return (1 - a[..., :3]) * (1 - a[..., 3:])
    if mode == "YCbCr":
        y, cb, cr = a[..., 0], a[..., 1] - 128 / 255, a[..., 2] - 128 / 255
        rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
        return np.clip(rgb, 0, 1)
    if mode == "LAB":
        return _lab_to_rgb(a * 255.0)
    if mode == "HSV":
        return _hsv_to_rgb(a)
    try:
        return np.asarray(im.convert("RGB")).astype(np.float64) / 255.0
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert an image of mode {mode} to RGB: {err}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> an 8-bit RGB PIL image (for display) by the module's rule."""
    if im.mode in EXACT_8BIT or (im.mode == "P" and "transparency" not in im.info):
        return im.convert("RGB")
    return Image.fromarray(np.round(unit_rgb(im) * 255).astype(np.uint8))


def image_tensor(im: Image.Image, resize: int | None = None, crop: int | None = None) -> Tensor:
    """Any PIL image -> (3, H, W) float32 in [-1, 1]: Resize(resize) (shorter side; None: none), then
    CenterCrop(crop) (None: none). Exact 8-bit modes go through torchvision's PIL path (RGB images give what
    ``Compose([Resize, CenterCrop, ToTensor])`` gives); others are resized per band in 32-bit float."""
    if im.mode in EXACT_8BIT or (im.mode == "P" and "transparency" not in im.info):
        planes = [im.convert("RGB")]
    else:
        v = unit_rgb(im).astype(np.float32)
        grey = bool((v[..., :1] == v).all())  # 16-bit / float images: one band, resized once
        planes = [Image.fromarray(np.ascontiguousarray(v[..., c])) for c in range(1 if grey else 3)]
    if resize is not None:
        planes = [TF.resize(p, int(resize)) for p in planes]
    if crop is not None:
        planes = [TF.center_crop(p, int(crop)) for p in planes]
    x = torch.cat([TF.to_tensor(p) for p in planes])
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1).contiguous()
    return x * 2 - 1
