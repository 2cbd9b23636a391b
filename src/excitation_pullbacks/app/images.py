"""Image input for the explorer: open a file safely, convert any PIL mode to RGB by its real value range,
and preprocess like the pipeline (Resize, CenterCrop, [-1, 1]).

Every problem a user can cause (not an image, too large, a decompression bomb, NaN pixels) raises
:class:`ImageError` with a one-line message the page shows as it is.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from excitation_pullbacks.models import digits_images
from excitation_pullbacks.pipeline.data import build_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageError",
    "digits_folder",
    "image_label",
    "list_images",
    "open_image",
    "preprocess",
    "to_rgb",
]

#: Largest image (width x height) the explorer decodes; larger ones are refused before decoding.
MAX_PIXELS = 40_000_000
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Alpha is composited over this background (white).
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An input the explorer cannot use; the message is meant for the user."""


def open_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """A file path (or an already open PIL image) -> an RGB PIL image, EXIF orientation applied.

    Raises ImageError for files PIL cannot identify, images over :data:`MAX_PIXELS` (checked from the header,
    before decoding), decompression bombs and truncated files.
    """
    if source is None:
        raise ImageError("no image: upload one, paste one, or pick one from the gallery")
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file {path.name} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        f"image {path.name} is too large ({w} x {h} pixels; at most "
                        f"{MAX_PIXELS // 1_000_000} megapixels)"
                    )
                im.seek(0)  # first frame of a GIF / multi-page TIFF
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image {path.name} is refused as a possible decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path.name} is not an image file (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"cannot read image {path.name}: {' '.join(str(err).split()) or type(err).__name__}") from None


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Integer or float pixel values -> uint8 by the range the mode stands for.

    I;16*: 0..65535 (the declared depth). I (32-bit int, depth unknown): 0..255 when the values fit, else min..max.
    F (float): 0..1 or 0..255 when the values fit, else min..max.
    """
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageError(f"the image ({mode}) holds NaN or infinite pixel values")
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16"):
        a = a / 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        pass
    elif lo >= 0 and hi <= 255:
        a = a / 255.0
    else:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB without clipping: 16-bit and float images are rescaled by their real range
    (:func:`_scale_to_uint8`), alpha (RGBA, LA, PA, P with transparency) is composited over white,
    CMYK / YCbCr / LAB / HSV go through PIL's colour conversion."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        grey = _scale_to_uint8(np.asarray(im), mode)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert an image of mode {mode} to RGB: {err}") from None


def preprocess(image: Image.Image, resize: int, crop: int) -> Tensor:
    """RGB PIL image -> (1, 3, crop, crop) float32 in [-1, 1]: Resize(resize) (shorter side), CenterCrop(crop)."""
    x = build_transform(int(resize), int(crop))(to_rgb(image))  # the pipeline's preprocessing
    return x.unsqueeze(0).float().clamp(-1, 1)


def list_images(folder: str | os.PathLike | None, limit: int = 60) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; at most ``limit``); [] for None or a missing folder."""
    if folder is None:
        return []
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return files[:limit]


def image_label(path: str | os.PathLike) -> str:
    """The class a folder image is named for, as the pipeline's FolderDataset reads it:
    ``3_chain_saw.jpg`` -> ``chain saw``, ``07_digit_3.png`` -> ``digit 3``, else the stem."""
    stem = Path(path).stem
    head, sep, tail = stem.partition("_")
    return (tail if sep and head.isdigit() else stem).replace("_", " ")


def digits_folder(root: str | os.PathLike | None = None, per_class: int = 2, size: int = 32) -> Path:
    """Write ``per_class`` test-split digits of each class as ``<nn>_digit_<d>.png`` (size x size grey) under
    ``root`` (default: a folder in the user's cache) once, and return it; the pipeline's FolderDataset reads
    the class from these names (``data=folder`` with ``model=digits_cnn``)."""
    if root is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        root = cache / "excitation_pullbacks" / f"digits-test-{size}px"
    root = Path(root)
    expected = 10 * per_class
    if len(list_images(root)) >= expected:
        return root
    root.mkdir(parents=True, exist_ok=True)
    images, labels = digits_images("test", size)
    n = 0
    for d in range(10):
        for i in (labels == d).nonzero().flatten()[:per_class].tolist():
            grey = ((images[i, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(grey, mode="L").save(root / f"{n:02d}_digit_{d}.png")
            n += 1
    return root
