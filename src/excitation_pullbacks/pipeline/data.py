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
from urllib.parse import quote

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import Imagenette

from excitation_pullbacks.downloads import PROBE_TIMEOUT, unreachable
from excitation_pullbacks.images import MAX_PIXELS, ImageError, image_tensor, open_image
from excitation_pullbacks.models import digits_images

from .classes import IMAGENETTE, IMAGENETTE_WNIDS, class_names, normalise_name, resolve_class
from .errors import PipelineError
from .signals import check_stop

__all__ = [
    "DigitsDataset",
    "EvaluationRows",
    "FolderDataset",
    "SyntheticDataset",
    "build_dataset",
    "build_transform",
    "evaluation_images",
    "export_files",
    "select_images",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: The class space whose labels a data kind yields; kinds not named here label in the model's space.
DATA_CLASS_SPACE = {"imagenette_hf": "imagenet", "imagenette_tv": "imagenet", "digits": "digits"}


def build_transform(resize: int = 256, crop: int = 224):
    """PIL image (any mode) -> (3, crop, crop) in [-1, 1]: each mode by its real value range
    (:func:`excitation_pullbacks.images.image_tensor`), Resize(resize), CenterCrop(crop)."""
    return partial(image_tensor, resize=int(resize), crop=int(crop))


class ImagenetteAsImageNet(Dataset):
    """Imagenette samples with their labels mapped to ImageNet indices: label y of ``base`` -> ``to_imagenet[y]``.

    base: a Hugging Face dataset (rows ``{image_key: PIL image, "label": int}``) or torchvision's Imagenette
    (``(PIL image, int)`` pairs). Yields ``(transform(image), ImageNet index)``.
    """

    def __init__(self, base, transform, to_imagenet: Sequence[int], image_key: str | None = None):
        self.base, self.transform, self.image_key = base, transform, image_key
        self.to_imagenet = tuple(to_imagenet)

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
        return [self.to_imagenet[int(y)] for y in raw]

    def __getitem__(self, i):
        item = self.base[i]
        if self.image_key is None:
            image, label = item
        else:
            image, label = item[self.image_key], item["label"]
        return self.transform(image), self.to_imagenet[int(label)]


def export_files(names, size: str, split: str) -> list[str]:
    """The parquet files of one size and split among a repository's file ``names`` (relative paths), in
    either layout of frgfm/imagenette's export: ``<size>/<split>/*.parquet`` (the Hub's parquet conversion)
    or ``<size>/<split>-NNNNN-of-NNNNN.parquet`` (the files committed on main)."""
    return sorted(n for n in names if n.endswith(".parquet") and n.startswith((f"{size}/{split}/", f"{size}/{split}-")))


def _hub_files(path: str, revision: str | None, where: str) -> list[str]:
    """The repository's file names at ``revision``, from one request with a short timeout (``datasets`` itself
    retries for about 25 s offline). Raises PipelineError when the Hub is unreachable or lacks the repo or
    revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    fix = "; or use data=folder data.root=<image dir>"
    try:
        info = HfApi().dataset_info(path, revision=revision, timeout=PROBE_TIMEOUT)
    except RevisionNotFoundError:
        raise PipelineError(
            f"cannot load {where}: the Hub has no revision {revision!r} of it (data.revision: a branch, tag or "
            f"commit sha){fix}"
        ) from None
    except RepositoryNotFoundError:
        raise PipelineError(f"cannot load {where}: the Hub has no such dataset (or it is private){fix}") from None
    except HfHubHTTPError as err:
        raise PipelineError(f"cannot load {where}: the Hub answered {err}{fix}") from None
    except Exception as err:
        # a connection failure: httpx's or httpx2's TransportError (by huggingface_hub version), or an OSError
        if not isinstance(err, OSError) and "TransportError" not in {c.__name__ for c in type(err).__mro__}:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(
            f"cannot load {where}: the Hugging Face Hub is unreachable ({reason}): download the export's "
            f"<size>/<split> parquet files where there is network and set data.path=<that folder>{fix}"
        ) from None
    return [s.rfilename for s in info.siblings or []]


def _hf_label_map(ds, where: str) -> list[int]:
    """ImageNet index of each label of a Hugging Face Imagenette: by the ClassLabel's names (frgfm's: "tench",
    "English springer", ...) when it has names, else Imagenette's order (sorted WordNet ids, as frgfm's)."""
    if "image" not in ds.column_names or "label" not in ds.column_names:
        raise PipelineError(f"{where} has columns {', '.join(ds.column_names)}; expected image and label")
    names = getattr(ds.features["label"], "names", None)
    if not names or all(str(n).isdigit() for n in names):
        return list(IMAGENETTE)
    try:
        return [resolve_class(normalise_name(n)) for n in names]
    except PipelineError as err:
        raise PipelineError(f"{where}: a label is not an ImageNet class: {err}") from None


def _imagenette_hf(cfg, transform) -> Dataset:
    """frgfm/imagenette's parquet export (or a local copy of its layout) through the ``parquet`` builder with
    the files of ``size`` and ``split`` named explicitly: neither the repo's loading script (refused by
    datasets >= 4) nor the other sizes are touched."""
    import datasets  # imported on use: it takes seconds to import and only this data kind needs it

    path, revision = str(cfg.path), cfg.get("revision")
    where = f"Hugging Face dataset {path} ({cfg.size}, {cfg.split}" + (f", revision {revision})" if revision else ")")
    root = Path(os.path.expanduser(path))
    if root.is_dir():
        names = [p.relative_to(root).as_posix() for p in root.rglob("*.parquet")]
        files = [str(root / n) for n in export_files(names, cfg.size, cfg.split)]
    elif datasets.config.HF_HUB_OFFLINE:
        raise PipelineError(
            f"cannot load {where}: offline mode (HF_HUB_OFFLINE) cannot reach the Hub: download the export's "
            f"{cfg.size}/{cfg.split} parquet files where there is network and set data.path=<that folder>; or use "
            f"data=folder data.root=<image dir>"
        )
    else:
        ref = quote(str(revision or "main"), safe="")
        files = [
            f"hf://datasets/{path}@{ref}/{n}"
            for n in export_files(_hub_files(path, revision, where), cfg.size, cfg.split)
        ]
    if not files:
        raise PipelineError(
            f"cannot load {where}: it holds no {cfg.size}/{cfg.split}/*.parquet or {cfg.size}/{cfg.split}-*.parquet "
            f"files (data.size: 160px | 320px | full_size; data.split: train | validation)"
        )
    try:
        ds = datasets.load_dataset(
            "parquet", data_files={cfg.split: files}, split=cfg.split, cache_dir=cfg.get("cache_dir")
        )
    except Exception as err:  # noqa: BLE001 - hub/network/cache errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"cannot load {where}: {first}; or use data=folder data.root=<image dir>") from None
    return ImagenetteAsImageNet(ds, transform, _hf_label_map(ds, where), image_key="image")


def _imagenette_tv(cfg, transform) -> Dataset:
    root = Path(os.path.expanduser(str(cfg.root)))
    url = Imagenette._ARCHIVES.get(cfg.size, ("imagenette2",))[0]
    folder = root / Path(url).stem  # what torchvision looks for: <root>/imagenette2-160/<split>/<wnid>/*.JPEG
    where = f"torchvision Imagenette ({cfg.size}, {cfg.split}) under {root}"
    fix = f"download {url} and extract it under {root} ({folder.name}/{cfg.split}/<wnid>/*.JPEG), or use data=folder"
    if bool(cfg.download) and cfg.size in Imagenette._ARCHIVES and not folder.exists():
        reason = unreachable(url)
        if reason is not None:
            raise PipelineError(f"cannot download {where}: {reason} - {fix} data.root=<image dir>")
    try:
        ds = Imagenette(str(root), split=cfg.split, size=cfg.size, download=bool(cfg.download))
    except Exception as err:  # noqa: BLE001 - URLError, RuntimeError('not found'), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"cannot load {where}: {first} - {fix} data.root=<image dir>") from None
    by_wnid = dict(zip(IMAGENETTE_WNIDS, IMAGENETTE, strict=True))
    unknown = [w for w in ds.wnids if w not in by_wnid]
    if unknown:
        raise PipelineError(f"{where}: folder(s) {', '.join(unknown)} are not Imagenette classes (WordNet ids)")
    # torchvision numbers the wnid folders present: map by name, not by position among all ten
    return ImagenetteAsImageNet(ds, transform, [by_wnid[w] for w in ds.wnids])


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


class EvaluationRows(Dataset):
    """The first ``num_images`` of a seeded shuffle of ``dataset``, read on demand (no image is held): item r
    is (image (C, H, W), label, dataset index, r). ``order`` (N,): the dataset indices of the rows."""

    def __init__(self, dataset, num_images: int, seed: int):
        if len(dataset) == 0:
            raise PipelineError("the dataset is empty")
        if num_images < 1:
            raise PipelineError(f"evaluate.num_images must be >= 1, got {num_images}")
        self.dataset = dataset
        self.order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, r: int):
        i = int(self.order[r])
        x, y = self.dataset[i]
        return x, int(y), i, int(r)


def evaluation_images(dataset, num_images: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of :class:`EvaluationRows` stacked -> images (N, C, H, W), labels (N,), indices (N,)."""
    rows = EvaluationRows(dataset, num_images, seed)
    items = [rows[r] for r in range(len(rows))]
    return torch.stack([im for im, *_ in items]), torch.tensor([y for _, y, *_ in items]), rows.order
