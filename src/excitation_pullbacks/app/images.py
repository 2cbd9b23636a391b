"""Image input for the explorer: open a file safely, convert any PIL mode to RGB by its real value range,
and preprocess like the pipeline (Resize, CenterCrop, [-1, 1]) - all through the core's
:mod:`excitation_pullbacks.images`, so the page and ``data=folder`` read an image alike.

Every problem a user can cause (not an image, too large, a decompression bomb, NaN pixels) raises
:class:`ImageError` with a one-line message the page shows as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from excitation_pullbacks import images as core_images
from excitation_pullbacks.images import ImageError, image_tensor, to_rgb
from excitation_pullbacks.models import digits_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageError",
    "digits_folder",
    "image_label",
    "list_images",
    "open_image",
    "open_upload",
    "preprocess",
    "to_rgb",
]

#: Largest image (width x height) the explorer decodes; larger ones are refused before decoding.
MAX_PIXELS = 40_000_000
#: Smallest width and height the explorer takes (a 1 x 1 "image" carries nothing to attribute).
MIN_SIDE = 8
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def open_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """A file path (or an already open PIL image) -> an RGB PIL image, EXIF orientation applied, every mode
    by its real value range (:func:`excitation_pullbacks.images.to_rgb`).

    Raises ImageError for files PIL cannot identify, images over :data:`MAX_PIXELS` (checked from the header,
    before decoding), decompression bombs, truncated files and NaN pixels.
    """
    if source is None:
        raise ImageError("no image: upload one, paste one, or pick one from the gallery")
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file {path.name} does not exist")
    return to_rgb(core_images.open_image(path, max_pixels=MAX_PIXELS))


def open_upload(path: str | os.PathLike) -> tuple[Image.Image, str]:
    """An uploaded or picked file -> (RGB PIL image as :func:`open_image` reads it, a one-line note of what was
    read: size, mode, and for an animated image that its first frame is used).

    Raises ImageError as :func:`open_image` does, and for an image smaller than :data:`MIN_SIDE` on a side;
    messages name the file by its name only (not the server's path to it).
    """
    if path is None:
        raise ImageError("no image: upload one, paste one, or pick one from the gallery")
    path = Path(path)
    try:
        raw = core_images.open_image(path, max_pixels=MAX_PIXELS)
    except ImageError as err:
        raise ImageError(str(err).replace(str(path), path.name)) from None
    w, h = raw.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"image {path.name} is {w} x {h} pixels: too small, give one at least {MIN_SIDE} x {MIN_SIDE}")
    with Image.open(path) as header:
        frames = int(getattr(header, "n_frames", 1))
    note = f"{path.name}: {w} x {h}, mode {raw.mode}"
    if raw.mode.startswith("I;16"):
        note += " (16-bit, read by its value range: / 65535)"
    elif raw.mode in ("I", "F"):
        note += " (32-bit, read by its value range)"
    if frames > 1:
        note += f"; {frames} frames: the first is used"
    return to_rgb(raw), note


def preprocess(image: Image.Image, resize: int, crop: int) -> Tensor:
    """PIL image (any mode) -> (1, 3, crop, crop) float32 in [-1, 1]: Resize(resize) (shorter side),
    CenterCrop(crop), as the pipeline's ``data=folder`` reads it."""
    return image_tensor(image, int(resize), int(crop)).unsqueeze(0).float().clamp(-1, 1)


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
