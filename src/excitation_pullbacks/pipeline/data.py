"""Datasets (Imagenette via Hugging Face or torchvision, image folders, scikit-learn digits, synthetic) and the
paper's selection.

Every dataset yields ``(image, label)``: image (3, H, W) float in [-1, 1] (H = W = crop, or data.size for
digits), label a class index in the model's class space (:mod:`.classes`: ImageNet, or digits 0..9).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import Imagenette

from excitation_pullbacks.images import MAX_PIXELS, ImageError, image_tensor, open_image
from excitation_pullbacks.models import digits_images

from .classes import IMAGENETTE, class_names, normalise_name, resolve_class
from .errors import PipelineError
from .signals import check_stop

__all__ = ["DigitsDataset", "FolderDataset", "SyntheticDataset", "build_dataset", "build_transform", "select_images"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: The class space whose labels a data kind yields; kinds not named here label in the model's space.
DATA_CLASS_SPACE = {"imagenette_hf": "imagenet", "imagenette_tv": "imagenet", "digits": "digits"}


def build_transform(resize: int = 256, crop: int = 224):
    """PIL image (any mode) -> (3, crop, crop) in [-1, 1]: each mode by its real value range
    (:func:`excitation_pullbacks.images.image_tensor`), Resize(resize), CenterCrop(crop)."""
    return partial(image_tensor, resize=int(resize), crop=int(crop))


class ImagenetteAsImageNet(Dataset):
    """Imagenette samples with labels mapped from Imagenette's 0..9 to ImageNet indices."""

    def __init__(self, base, transform, image_key=None):
        self.base, self.transform, self.image_key = base, transform, image_key

    def __len__(self):
        return len(self.base)

    @property
    def labels(self) -> list[int] | None:
        """ImageNet labels of all samples without decoding images (None when the base cannot tell)."""
        if self.image_key is not None:
            raw = self.base["label"]
        elif hasattr(self.base, "_samples"):
            raw = [y for _, y in self.base._samples]
        else:
            return None
        return [IMAGENETTE[int(y)] for y in raw]

    def __getitem__(self, i):
        item = self.base[i]
        if self.image_key is None:
            image, label = item
        else:
            image, label = item[self.image_key], item["label"]
        return self.transform(image), IMAGENETTE[int(label)]


def _imagenette_hf(cfg, transform) -> Dataset:
    import datasets  # imported on use: it takes seconds to import and only this data kind needs it

    # the export's sizes are folders of one default config: chosen with data_dir, not a config name
    try:
        ds = datasets.load_dataset(
            cfg.path, revision=cfg.revision, data_dir=cfg.size, split=cfg.split, cache_dir=cfg.get("cache_dir")
        )
    except Exception as err:  # noqa: BLE001 - hub/network/cache errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(
            f"cannot load Hugging Face dataset {cfg.path} ({cfg.size}, {cfg.split}): {first} - use data=folder "
            f"data.root=<image dir>, or set HF_DATASETS_CACHE / data.cache_dir to a cache that holds it"
        ) from None
    return ImagenetteAsImageNet(ds, transform, image_key="image")


def _imagenette_tv(cfg, transform) -> Dataset:
    root = Path(os.path.expanduser(str(cfg.root)))
    try:
        ds = Imagenette(str(root), split=cfg.split, size=cfg.size, download=bool(cfg.download))
    except Exception as err:  # noqa: BLE001 - URLError, RuntimeError('not found'), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        archive = Imagenette._ARCHIVES.get(cfg.size, ("imagenette2",))[0]
        raise PipelineError(
            f"cannot load torchvision Imagenette ({cfg.size}, {cfg.split}) under {root}: {first} - use "
            f"data=folder data.root=<image dir>, or extract {Path(archive).name} under {root}"
        ) from None
    return ImagenetteAsImageNet(ds, transform)


class FolderDataset(Dataset):
    """Images under ``root`` (recursively, sorted). Class: the sub-folder name for files in a sub-folder,
    else the file name without a leading ``<number>_`` (``3_chain_saw.jpg`` -> chain saw); names or indices
    of the class space ``space``. Files are opened with EXIF orientation applied and refused above
    ``max_pixels`` (``data.max_pixels``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform,
        label_from: str = "auto",
        space: str = "imagenet",
        max_pixels: int | None = MAX_PIXELS,
    ):
        self.root = Path(os.path.expanduser(str(root)))
        self.transform = transform
        self.space = space
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise PipelineError(f"image folder {self.root} does not exist or is not a directory")
        try:
            files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        except OSError as err:
            raise PipelineError(f"cannot read image folder {self.root}: {err}") from None
        if not files:
            raise PipelineError(f"image folder {self.root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if label_from not in ("auto", "filename", "folder"):
            raise PipelineError(f"data.label_from must be auto, filename or folder, got {label_from!r}")
        self.files = files
        self.labels = [self._label(p, label_from) for p in files]

    def _label(self, path: Path, label_from: str) -> int:
        rel = path.relative_to(self.root)
        if label_from == "folder" or (label_from == "auto" and len(rel.parts) > 1):
            if len(rel.parts) < 2:
                raise PipelineError(f"{path} is not in a class sub-folder of {self.root}")
            name = rel.parts[-2]
        else:
            stem = path.stem
            head, sep, tail = stem.partition("_")
            name = tail if sep and head.isdigit() else stem
        try:
            return resolve_class(normalise_name(name), self.space)
        except PipelineError as err:
            raise PipelineError(f"cannot tell the class of {path}: {err}") from None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            x = self.transform(open_image(path, max_pixels=self.max_pixels, option="data.max_pixels"))
        except ImageError as err:
            raise PipelineError(str(err)) from None
        return x, self.labels[i]


class SyntheticDataset(Dataset):
    """Seeded smooth random images for tests: ``num_images`` images cycling through ``classes``."""

    def __init__(self, classes: Sequence[int], num_images: int, size: int, seed: int = 0):
        if not classes:
            raise PipelineError("synthetic data needs at least one class")
        self.classes, self.num_images, self.size, self.seed = list(classes), int(num_images), int(size), int(seed)

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
        x = torch.nn.functional.interpolate(low, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x + 0.1 * (torch.rand(x.shape, generator=g) * 2 - 1)).clamp(-1, 1)
        return x[0], self.classes[i % len(self.classes)]


class DigitsDataset(Dataset):
    """scikit-learn's digits (:func:`excitation_pullbacks.digits.digits_images`): split "train" | "test" | "all",
    images (3, size, size) in [-1, 1], labels 0..9."""

    def __init__(self, split: str = "test", size: int = 32):
        try:
            self.images, labels = digits_images(split, int(size))
        except ValueError as err:
            raise PipelineError(f"data=digits: {err}") from None
        self.labels = labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def build_dataset(cfg, classes: Sequence[int], space: str = "imagenet") -> Dataset:
    """The dataset ``cfg`` (a ``data`` config group node) names, labelled in the class space ``space`` (the
    model's); ``classes`` label synthetic images. A kind whose labels live in another space is an error."""
    kind = cfg.kind
    own = DATA_CLASS_SPACE.get(kind)
    if own is not None and own != space:
        fits = [k for k, v in DATA_CLASS_SPACE.items() if v == space] + ["folder", "synthetic"]
        raise PipelineError(
            f"data={kind} holds {own} classes but the model's classes are {space} (model.classes); "
            f"choose data={' | '.join(fits)}"
        )
    if kind == "digits":
        return DigitsDataset(cfg.get("split", "test"), cfg.get("size", 32))
    if kind == "synthetic":
        return SyntheticDataset(classes, cfg.num_images, cfg.crop, cfg.get("seed", 0))
    transform = build_transform(int(cfg.resize), int(cfg.crop))
    if kind == "imagenette_hf":
        return _imagenette_hf(cfg, transform)
    if kind == "imagenette_tv":
        return _imagenette_tv(cfg, transform)
    if kind == "folder":
        if cfg.root is None:
            raise PipelineError("data=folder needs data.root=<image dir>")
        max_pixels = cfg.get("max_pixels", MAX_PIXELS)
        if max_pixels is not None and int(max_pixels) < 1:
            raise PipelineError(f"data.max_pixels must be >= 1 or null, got {max_pixels}")
        return FolderDataset(
            cfg.root, transform, cfg.get("label_from", "auto"), space, None if max_pixels is None else int(max_pixels)
        )
    raise PipelineError(f"unknown data kind {kind!r}")


def select_images(
    dataset: Dataset, classes: Sequence[int], *, batch_size: int = 5, seed: int = 314, space: str = "imagenet"
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's selection: the first image of each class in a seeded shuffled DataLoader pass.

    classes: class indices of ``space`` (named in the error when the data holds none of a class).
    Returns images (R, 3, H, W) in [-1, 1], labels (R,), dataset indices (R,), row r holding ``classes[r]``.
    """
    if len(dataset) == 0:
        raise PipelineError("the dataset is empty")
    order = DataLoader(
        range(len(dataset)), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    wanted = {c: r for r, c in enumerate(classes)}
    found: dict[int, tuple[Tensor, int]] = {}
    labels = getattr(dataset, "labels", None)  # skip decoding images of other classes when known
    for batch in order:  # index batches: the same order as a shuffled DataLoader over the images
        check_stop()  # SIGINT/SIGTERM during a long scan of a large folder
        for i in batch.tolist():
            if labels is not None and labels[i] not in wanted:
                continue
            x, y = dataset[i]
            if y in wanted and y not in found:
                found[y] = (x, i)
        if len(found) == len(wanted):
            break
    missing = [c for c in classes if c not in found]
    if missing:
        names = ", ".join(f"{class_names(space)[c]} ({c})" for c in missing)
        raise PipelineError(f"the data holds no image of class {names}")
    images = torch.stack([found[c][0] for c in classes])
    return images, torch.tensor(list(classes)), torch.tensor([found[c][1] for c in classes])
