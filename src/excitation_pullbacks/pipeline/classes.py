"""Class spaces for run configs: the core's :mod:`excitation_pullbacks.models.classes` with its errors as
:class:`PipelineError` (one ``error:`` line at the CLI), and the space a config names (``model.classes``;
ImageNet when absent).
"""

from __future__ import annotations

from collections.abc import Sequence

from excitation_pullbacks.models import classes as core
from excitation_pullbacks.models.classes import (
    CLASS_SPACES,
    IMAGENETTE,
    IMAGENETTE_WNIDS,
    ClassSpaceError,
    imagenet_classes,
    normalise_name,
)

from .errors import PipelineError

__all__ = [
    "CLASS_SPACES",
    "IMAGENETTE",
    "IMAGENETTE_WNIDS",
    "class_names",
    "class_space",
    "imagenet_classes",
    "normalise_name",
    "resolve_class",
    "resolve_classes",
]


def class_names(space: str = "imagenet") -> tuple[str, ...]:
    """The class names of ``space`` (one of :data:`CLASS_SPACES`), index = class id."""
    try:
        return core.class_names(space)
    except ClassSpaceError as err:
        raise PipelineError(str(err)) from None


def class_space(cfg) -> str:
    """``cfg.model.classes`` of a run config (DictConfig or plain dict); ``imagenet`` when absent."""
    space = str((cfg.get("model") or {}).get("classes") or "imagenet")
    if space not in CLASS_SPACES:
        raise PipelineError(f"unknown class space model.classes={space!r}; choose one of {', '.join(CLASS_SPACES)}")
    return space


def resolve_class(spec: int | str, space: str = "imagenet") -> int:
    """A class index of ``space`` from an index (int or digit string) or a class name (case/underscore-insensitive)."""
    try:
        return core.resolve_class(spec, space)
    except ClassSpaceError as err:
        raise PipelineError(str(err)) from None


def resolve_classes(specs: Sequence[int | str], space: str = "imagenet") -> list[int]:
    """resolve_class for each entry, in order."""
    return [resolve_class(s, space) for s in specs]
