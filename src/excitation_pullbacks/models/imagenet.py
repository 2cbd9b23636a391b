"""ImageNet classifiers: the [-1, 1] input wrapper and loading torchvision models (weights enums, local
checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..downloads import unreachable
from .checkpoint import load_checkpoint

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNetInput", "WeightsUnavailableError", "torchvision_model"]

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


def torchvision_model(
    name: str,
    weights: str | None = "IMAGENET1K_V1",
    *,
    checkpoint: str | os.PathLike | None = None,
    wrap: bool = True,
    num_classes: int | None = None,
) -> nn.Module:
    """A torchvision classifier in eval mode, wrapped in :class:`ImageNetInput` unless ``wrap=False``.

    name: any torchvision classification model name (resnet50, vgg11_bn, densenet121, ...).
    weights: a weights enum member name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) or None for random weights.
    checkpoint: a local state-dict file loaded into the (randomly initialised) backbone instead
        (:func:`~excitation_pullbacks.models.checkpoint.load_checkpoint`).
    num_classes: the number of logits (None: the weights' classes, 1000 without weights). With weights for
        another number of classes, every parameter but the classifier head comes from the weights and the
        head (the parameters whose shape depends on the class count) is freshly initialised from torch's
        random state. ValueError when the architecture has no such head.
    """
    # torchvision is imported here, not at the top: it takes seconds to import and the core (pullbacks of
    # any nn.Module) does not need it
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        raise ValueError(
            f"unknown model {name!r}; torchvision classifiers include: resnet50, vgg11_bn, densenet121, ..."
        )
    if checkpoint is not None:
        weights = None
    if weights is not None:
        try:
            weights = tvm.get_model_weights(name)[weights]
        except KeyError:
            options = ", ".join(w.name for w in tvm.get_model_weights(name))
            raise ValueError(f"model {name} has no weights {weights!r}; choose one of {options}, or null") from None
    if weights is not None:
        # torch.hub's cache file for the enum's url: read when present, else downloaded (probed first: without a
        # network the download would fail only after DNS/connect timeouts)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        reason = None if cache.is_file() else unreachable(weights.url)
        if reason is not None:
            raise WeightsUnavailableError(_missing_weights(name, weights, cache, f"cannot download: {reason}"))
    try:
        if num_classes is not None and (weights is None or int(num_classes) != len(weights.meta["categories"])):
            backbone = _with_head(tvm, name, weights, int(num_classes))
        else:
            backbone = tvm.get_model(name, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if weights is None:
            raise
        raise WeightsUnavailableError(_missing_weights(name, weights, cache, type(err).__name__)) from None
    if checkpoint is not None:
        load_checkpoint(backbone, checkpoint)
    model = ImageNetInput(backbone) if wrap else backbone
    return model.eval()


def _missing_weights(name: str, weights, cache: Path, why: str) -> str:
    return (
        f"cannot load {name} weights {weights.name} ({why}): put {cache.name} in {cache.parent} (from "
        f"{weights.url}; TORCH_HOME moves that folder), pass a local checkpoint, or use random weights (weights=null)"
    )


def _with_head(tvm, name: str, weights, num_classes: int) -> nn.Module:
    """torchvision model ``name`` built for ``num_classes`` logits; with ``weights``, all its parameters but
    the head (those whose shape differs from the weights') loaded from them."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model {name} has no classifier head to replace ({err})") from None
    if weights is None:
        return model
    pretrained = tvm.get_model(name, weights=weights).state_dict()
    own = model.state_dict()
    head = {k for k in own.keys() & pretrained.keys() if own[k].shape != pretrained[k].shape}
    unset = own.keys() - pretrained.keys()
    if unset or pretrained.keys() - own.keys() or not head:
        odd = sorted(unset | (pretrained.keys() - own.keys()))
        raise ValueError(
            f"model {name} has no classifier head to replace: its {weights.name} weights do not fit the "
            f"{num_classes}-class model but for one head (parameters {', '.join(odd[:3]) or 'none of another shape'})"
        )
    model.load_state_dict({k: v for k, v in pretrained.items() if k not in head}, strict=False)
    return model
