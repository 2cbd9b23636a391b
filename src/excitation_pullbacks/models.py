"""Models: the [-1, 1] input wrapper and loading torchvision classifiers (weights enums, local checkpoints),
and the small digits CNN that ships with the package (``digits_cnn``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNetInput", "build_model", "WeightsUnavailableError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


class ImageNetInput(nn.Module):
    """Maps images in [-1, 1] to ImageNet normalisation, then runs ``backbone``.

    forward: x (N, 3, H, W) in [-1, 1] -> backbone(((x + 1) / 2 - mean) / std), e.g. logits (N, 1000).
    Pullbacks and ascent through this wrapper are taken with respect to the [-1, 1] image.
    """

    def __init__(self, backbone: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(((x + 1) / 2 - self.mean) / self.std)


#: The model name of :class:`~excitation_pullbacks.digits.DigitsCNN`; its weights names (the committed checkpoint).
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
) -> nn.Module:
    """A torchvision classifier in eval mode, wrapped in :class:`ImageNetInput` unless ``wrap=False``; or the
    digits CNN.

    name: any torchvision classification model name (resnet50, vgg11_bn, densenet121, ...), or ``digits_cnn``
    (:class:`~excitation_pullbacks.digits.DigitsCNN`, 10 classes; it takes [-1, 1] images itself and is never
    wrapped).
    weights: a weights enum member name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) or None for random weights.
    For digits_cnn: omitted, DEFAULT or digits -> the committed checkpoint; None -> random init.
    checkpoint: a local state-dict file loaded into the (randomly initialised) backbone instead.
    """
    if name == DIGITS_CNN:
        return _digits_cnn(weights, checkpoint)
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        raise ValueError(f"unknown model {name!r}; torchvision classifiers include: resnet50, vgg11_bn, "
                         f"densenet121, ...; or {DIGITS_CNN}")
    if checkpoint is not None:
        weights = None
    if weights is not None:
        try:
            weights = tvm.get_model_weights(name)[weights]
        except KeyError:
            options = ", ".join(w.name for w in tvm.get_model_weights(name))
            raise ValueError(f"model {name} has no weights {weights!r}; choose one of {options}, or null") from None
    try:
        backbone = tvm.get_model(name, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if weights is None:
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailableError(
            f"cannot load {name} weights {weights.name} ({type(err).__name__}): put {Path(weights.url).name} "
            f"in {cache.parent} (from {weights.url}), pass a local checkpoint, or use random weights (weights=null)"
        ) from None
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        backbone.load_state_dict(state)
    model = ImageNetInput(backbone) if wrap else backbone
    return model.eval()


def _digits_cnn(weights: str | None, checkpoint: str | os.PathLike | None) -> nn.Module:
    from .digits import DigitsCNN, load_digits_cnn

    if checkpoint is not None:
        return load_digits_cnn(checkpoint)
    if weights is None:
        return DigitsCNN().eval()
    if weights is _DEFAULT_WEIGHTS or weights in DIGITS_WEIGHTS:
        return load_digits_cnn()
    raise ValueError(f"model {DIGITS_CNN} has no weights {weights!r}; choose one of {', '.join(DIGITS_WEIGHTS)}, or null")
