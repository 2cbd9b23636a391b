"""Class spaces (the classes a model's logits stand for) with their names, and name/index lookup.

``imagenet``: the 1000 ImageNet-1k classes (names from torchvision's weights metadata, available offline).
``digits``: the ten digits of :mod:`excitation_pullbacks.models.digits`, named ``digit 0`` ... ``digit 9``.
Bad input (an unknown space, class name or an index out of range) raises :class:`ClassSpaceError`, a
ValueError with a one-line message.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from functools import cache, lru_cache

from torchvision.models import ResNet50_Weights

__all__ = [
    "CLASS_SPACES",
    "IMAGENETTE",
    "IMAGENETTE_WNIDS",
    "ClassSpaceError",
    "class_names",
    "imagenet_classes",
    "normalise_name",
    "resolve_class",
    "resolve_classes",
]

#: ImageNet indices of the ten Imagenette classes, in Imagenette's label order (sorted WordNet ids).
IMAGENETTE = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
#: WordNet ids of the ten Imagenette classes (the folder names of its archives), in the same order.
IMAGENETTE_WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
)
#: Names of the class spaces (the pipeline's ``model.classes``).
CLASS_SPACES = ("imagenet", "digits")
_TITLES = {"imagenet": "ImageNet", "digits": "digits"}


class ClassSpaceError(ValueError):
    """An unknown class space, class name, or a class index out of range."""


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = class id."""
    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(space: str = "imagenet") -> tuple[str, ...]:
    """The class names of ``space`` (one of :data:`CLASS_SPACES`), index = class id."""
    if space == "imagenet":
        return imagenet_classes()
    if space == "digits":
        return tuple(f"digit {d}" for d in range(10))
    raise ClassSpaceError(f"unknown class space {space!r}; choose one of {', '.join(CLASS_SPACES)}")


def normalise_name(name: str) -> str:
    """'English_springer', 'english-springer' -> 'english springer'."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@cache
def _by_name(space: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for i, n in enumerate(class_names(space)):
        table.setdefault(normalise_name(n), i)
    return table


def resolve_class(spec: int | str, space: str = "imagenet") -> int:
    """A class index of ``space`` from an index (int or digit string) or a class name (case/underscore-insensitive)."""
    if isinstance(spec, bool):
        raise ClassSpaceError(f"invalid class {spec!r}")
    n = len(class_names(space))
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        i = int(spec)
        if not 0 <= i < n:
            raise ClassSpaceError(f"class index {i} is out of range 0..{n - 1}")
        return i
    key = normalise_name(spec)
    table = _by_name(space)
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if space == "digits" and not close:
        hint = "; digits are 0..9 or 'digit 0'..'digit 9' (targets=digits)"
    raise ClassSpaceError(f"unknown {_TITLES[space]} class name {spec!r}{hint}")


def resolve_classes(specs: Sequence[int | str], space: str = "imagenet") -> list[int]:
    """resolve_class for each entry, in order."""
    return [resolve_class(s, space) for s in specs]
