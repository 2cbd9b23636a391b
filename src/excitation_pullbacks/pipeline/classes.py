"""ImageNet class names (from torchvision's weights metadata, available offline) and name/index lookup."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from functools import lru_cache

from .errors import PipelineError

__all__ = ["IMAGENETTE", "imagenet_classes", "normalise_name", "resolve_class", "resolve_classes"]

#: ImageNet indices of the ten Imagenette classes, in Imagenette's label order (sorted WordNet ids).
IMAGENETTE = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = class id."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def normalise_name(name: str) -> str:
    """'English_springer', 'english-springer' -> 'english springer'."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@lru_cache(maxsize=1)
def _by_name() -> dict[str, int]:
    table: dict[str, int] = {}
    for i, n in enumerate(imagenet_classes()):
        table.setdefault(normalise_name(n), i)
    return table


def resolve_class(spec: int | str) -> int:
    """An ImageNet class index from an index (int or digit string) or a class name (case/underscore-insensitive)."""
    if isinstance(spec, bool):
        raise PipelineError(f"invalid class {spec!r}")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        i = int(spec)
        if not 0 <= i < 1000:
            raise PipelineError(f"class index {i} is out of range 0..999")
        return i
    key = normalise_name(spec)
    table = _by_name()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise PipelineError(f"unknown ImageNet class name {spec!r}{hint}")


def resolve_classes(specs: Sequence[int | str]) -> list[int]:
    """resolve_class for each entry, in order."""
    return [resolve_class(s) for s in specs]
