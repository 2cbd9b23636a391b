"""Training data from an image folder with one sub-folder per class (torchvision's ``ImageFolder`` layout,
classes in sorted sub-folder order), and its seeded stratified train / validation split.

Images go through the pipeline's own transform (:func:`.data.build_transform`: (3, crop, crop) in [-1, 1],
EXIF orientation applied, refused above ``max_pixels``), so a model trained on them takes the same input as
every other model of the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from excitation_pullbacks.images import MAX_PIXELS, ImageError, open_image

from .data import IMAGE_EXTENSIONS, build_transform
from .errors import PipelineError

__all__ = ["ClassFolder", "class_folder", "is_image_file", "stratified_split"]


class ClassFolder(Dataset):
    """``root/<class>/<image>``: item i -> (image (3, crop, crop) in [-1, 1], class index). ``classes``: the
    class names (sub-folder names, sorted), ``labels``: every image's class index without decoding it."""

    def __init__(self, folder: ImageFolder, max_pixels: int | None):
        self.folder, self.max_pixels = folder, max_pixels
        self.classes: list[str] = list(folder.classes)
        self.labels: list[int] = list(folder.targets)
        self.files: list[Path] = [Path(p) for p, _ in folder.samples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            image = open_image(self.files[i], max_pixels=self.max_pixels, option="data.max_pixels")
        except ImageError as err:
            raise PipelineError(str(err)) from None
        return self.folder.transform(image), self.labels[i]


def is_image_file(path: str) -> bool:
    """Whether ``path`` has one of the image extensions the pipeline reads (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def class_folder(cfg, classes: list[str] | None = None) -> ClassFolder:
    """The class folder ``cfg`` (a ``data=folder`` node: root, resize, crop, max_pixels) names.

    classes: the class names a trained model's logits stand for (its run's order); None: every sub-folder.
    PipelineError for a missing folder, fewer than 2 classes, a class folder without images, or (with
    ``classes``) a folder whose classes differ.
    """
    if cfg.get("root") in (None, "???"):
        raise PipelineError("data=folder needs data.root=<image dir with one sub-folder per class>")
    root = Path(os.path.expanduser(str(cfg.root)))
    if not root.is_dir():
        raise PipelineError(f"image folder {root} does not exist or is not a directory")
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())  # as ImageFolder finds them
    if classes is None and len(found) < 2:
        raise PipelineError(
            f"image folder {root} holds {len(found)} class sub-folder(s) ({', '.join(found) or 'none'}); training "
            f"needs at least 2: put each class's images in root/<class name>/"
        )
    if classes is not None and found != list(classes):
        raise PipelineError(
            f"image folder {root} holds classes {found}, but the model was trained on {list(classes)}: "
            "use the folder it was trained on"
        )
    max_pixels = cfg.get("max_pixels", MAX_PIXELS)
    if max_pixels is not None and int(max_pixels) < 1:
        raise PipelineError(f"data.max_pixels must be >= 1 or null, got {max_pixels}")
    try:
        folder = ImageFolder(
            str(root),
            transform=build_transform(int(cfg.resize), int(cfg.crop)),
            is_valid_file=is_image_file,
            allow_empty=False,
        )
    except (FileNotFoundError, OSError) as err:  # a class folder without images, unreadable folders
        raise PipelineError(f"image folder {root}: {str(err).splitlines()[0]}") from None
    return ClassFolder(folder, None if max_pixels is None else int(max_pixels))


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, validation), each sorted: per class a seeded random ``fraction`` of its images (rounded,
    at least one where the class has two or more, never all) held out. The same split on every machine."""
    if not 0 <= fraction < 1:
        raise PipelineError(f"train.val_fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(int(seed))
    y = torch.tensor(labels)
    train, val = [], []
    for c in sorted(set(labels)):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = min(max(round(len(idx) * fraction), 1 if fraction > 0 and len(idx) > 1 else 0), len(idx) - 1)
        val.append(idx[:n])
        train.append(idx[n:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
