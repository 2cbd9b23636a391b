"""timm classifiers (the optional ``timm`` extra): ``build_model("timm/pvt_v2_b1", weights="timm")``.

Weights come from timm's own names: ``timm`` (the model's default pretrained tag) or a tag such as
``in1k`` (``pvt_v2_b1.in1k``); they are read from the Hugging Face Hub cache, or downloaded. The model is
wrapped in :class:`~excitation_pullbacks.models.imagenet.ImageNetInput` with the normalisation of its
pretrained config, so pullbacks are taken with respect to [-1, 1] images as for torchvision models.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from torch import nn

from ..downloads import unreachable
from .checkpoint import load_checkpoint
from .imagenet import ImageNetInput, WeightsUnavailableError

__all__ = ["TIMM_PREFIX", "input_size", "timm_model"]

#: Model names with this prefix are timm's (``timm/deit_small_patch16_224``).
TIMM_PREFIX = "timm/"
_HUB = "https://huggingface.co"


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need the timm extra: pip install 'excitation-pullbacks[timm]'") from None
    return timm


@contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub reads its offline switch from its constants on each request: set it for the block."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def timm_model(
    name: str,
    weights: str | None = "timm",
    *,
    checkpoint: str | os.PathLike | None = None,
    wrap: bool = True,
    num_classes: int | None = None,
) -> nn.Module:
    """A timm classifier in eval mode (``name`` without the ``timm/`` prefix), wrapped unless ``wrap=False``.

    weights: ``timm`` / ``DEFAULT`` (the default pretrained tag), another tag of the model (``in1k``), or None
    (random weights). checkpoint: a local state dict loaded instead. num_classes: the number of logits.
    """
    timm = _timm()
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; e.g. pvt_v2_b1, deit_small_patch16_224, convnext_tiny")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if checkpoint is not None or weights is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
    else:
        full = name if weights in ("timm", "DEFAULT") else f"{name}.{weights}"
        reason = unreachable(_HUB)  # probed first: the Hub client retries for about a minute before it fails
        try:
            with _hub_offline(reason is not None):  # unreachable: the local cache only
                model = timm.create_model(full, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as err:  # huggingface_hub's errors are OSErrors
            reason = reason or type(err).__name__
            raise WeightsUnavailableError(
                f"cannot load timm weights {full} (cannot download: {reason}): fill the Hugging Face Hub cache "
                "(HF_HOME) where a network reaches it, pass a local checkpoint, or use random weights (weights=null)"
            ) from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    return (ImageNetInput(model, mean, std) if wrap else model).eval()


def input_size(name: str) -> int:
    """The image size a timm model was made for (its pretrained config), e.g. 224."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else 224
