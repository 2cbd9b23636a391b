"""``build_model(name)``: a classifier by name, torchvision's or the digits CNN that ships with the package."""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .digits import DigitsCNN, load_digits_cnn
from .heads import randomize_zero_heads
from .imagenet import torchvision_model
from .timm_models import TIMM_PREFIX, timm_model

__all__ = ["DIGITS_CNN", "DIGITS_WEIGHTS", "build_model"]

#: The model name of :class:`~excitation_pullbacks.models.digits.DigitsCNN`; its weights names (the committed
#: checkpoint).
DIGITS_CNN = "digits_cnn"
DIGITS_WEIGHTS = ("DEFAULT", "digits")


class _DefaultWeights(str):
    """``build_model``'s default weights: the string IMAGENET1K_V1 (the paper's) for torchvision models; told
    apart by identity so that ``digits_cnn`` can take its own trained weights when none are named."""


_DEFAULT_WEIGHTS = _DefaultWeights("IMAGENET1K_V1")


def build_model(
    name: str,
    weights: str | None = _DEFAULT_WEIGHTS,
    *,
    checkpoint: str | os.PathLike | None = None,
    wrap: bool = True,
    num_classes: int | None = None,
    compile: bool = False,
) -> nn.Module:
    """A torchvision classifier in eval mode, wrapped in :class:`~excitation_pullbacks.models.ImageNetInput`
    unless ``wrap=False``; or the digits CNN.

    name: any torchvision classification model name (resnet50, vgg11_bn, densenet121, vit_b_16, swin_t, ...),
    ``timm/<name>`` for a timm model (the ``timm`` extra; weights ``timm`` or a tag such as ``in1k``), or ``digits_cnn``
    (:class:`~excitation_pullbacks.models.digits.DigitsCNN`, 10 classes; it takes [-1, 1] images itself and is
    never wrapped).
    weights: a weights enum member name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) or None for random weights:
    the library's initialisation, except that an all-zero classifier head (torchvision's ViTs start theirs at
    zero, which makes every logit constant and every pullback 0) is drawn from N(0, 0.02^2) with torch's random
    state (:func:`~excitation_pullbacks.models.heads.randomize_zero_heads`); not when a checkpoint is loaded.
    For digits_cnn: omitted, DEFAULT or digits -> the committed checkpoint; None -> random init.
    checkpoint: a local state-dict file loaded into the (randomly initialised) model instead.
    num_classes: the number of logits (None: the weights' own); with weights for another count, the classifier
    head is replaced by a freshly initialised one (e.g. a checkpoint of ``task=train`` on a 5-class folder
    loads with ``num_classes=5``).
    compile: return ``torch.compile(model)`` (compiled on its first call; the core functions take it as they
    take the model itself).
    """
    if name == DIGITS_CNN:
        model = _digits_cnn(weights, checkpoint, num_classes)
    elif name.startswith(TIMM_PREFIX):
        timm_weights = "timm" if weights is _DEFAULT_WEIGHTS else weights
        model = timm_model(
            name[len(TIMM_PREFIX) :], timm_weights, checkpoint=checkpoint, wrap=wrap, num_classes=num_classes
        )
    else:
        try:
            model = torchvision_model(name, weights, checkpoint=checkpoint, wrap=wrap, num_classes=num_classes)
        except ValueError as err:
            if str(err).startswith("unknown model"):
                raise ValueError(f"{err}; or {DIGITS_CNN}") from None
            raise
    if weights is None and checkpoint is None:
        randomize_zero_heads(model)
    return torch.compile(model) if compile else model


def _digits_cnn(weights: str | None, checkpoint: str | os.PathLike | None, num_classes: int | None) -> nn.Module:
    classes = 10 if num_classes is None else int(num_classes)
    if classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {classes}")
    if checkpoint is not None:
        return load_checkpoint(DigitsCNN(num_classes=classes), checkpoint).eval()
    if weights is None:
        return DigitsCNN(num_classes=classes).eval()
    if weights is _DEFAULT_WEIGHTS or weights in DIGITS_WEIGHTS:
        model = load_digits_cnn()
        if classes != 10:  # a fresh head for another class count, initialised from torch's random state
            model.classifier = nn.Linear(model.classifier.in_features, classes)
        return model.eval()
    raise ValueError(
        f"model {DIGITS_CNN} has no weights {weights!r}; choose one of {', '.join(DIGITS_WEIGHTS)}, or null"
    )
