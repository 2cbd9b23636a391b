"""Model options of the explorer and their cached loading: each (name, weights, checkpoint, device) is built
once per process and shared by all users (the models are only read: pullbacks freeze and restore them).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from excitation_pullbacks import build_model, excitation
from excitation_pullbacks.models import WeightsUnavailableError
from excitation_pullbacks.models.classes import class_names

__all__ = [
    "MODEL_OPTIONS",
    "LoadedModel",
    "ModelError",
    "ModelSpec",
    "class_names_for",
    "load_model",
    "loaded_model",
    "output_layout",
    "resolve_device",
    "spec_from_key",
]


class ModelError(ValueError):
    """A model that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``build_model`` takes: a model name, a weights name (None: random), a local checkpoint."""

    name: str
    weights: str | None = None
    checkpoint: str | None = None

    @property
    def key(self) -> str:
        """``name|weights`` (``null`` for random), the value the model dropdown carries."""
        return f"{self.name}|{'null' if self.weights is None else self.weights}"

    @property
    def label(self) -> str:
        if self.checkpoint:
            return f"{self.name}: checkpoint {Path(self.checkpoint).name}"
        if self.name == "digits_cnn":
            return "digits_cnn: trained (shipped)" if self.weights is not None else "digits_cnn: random weights"
        return f"{self.name}: {self.weights}" if self.weights is not None else f"{self.name}: random weights"


#: The choices the page offers: the ReLU paper's three models and three transformers / modern networks of the
#: deep-network method (ViT-B/16, Swin-T, ConvNeXt-T), each with its ImageNet weights or random, and the digits CNN.
MODEL_OPTIONS = (
    ModelSpec("digits_cnn", "DEFAULT"),
    ModelSpec("digits_cnn", None),
    ModelSpec("resnet50", "IMAGENET1K_V1"),
    ModelSpec("resnet50", None),
    ModelSpec("vgg11_bn", "IMAGENET1K_V1"),
    ModelSpec("vgg11_bn", None),
    ModelSpec("densenet121", "IMAGENET1K_V1"),
    ModelSpec("densenet121", None),
    ModelSpec("vit_b_16", "IMAGENET1K_V1"),
    ModelSpec("vit_b_16", None),
    ModelSpec("swin_t", "IMAGENET1K_V1"),
    ModelSpec("swin_t", None),
    ModelSpec("convnext_tiny", "IMAGENET1K_V1"),
    ModelSpec("convnext_tiny", None),
)


def spec_from_key(key: str, checkpoint: str | None = None) -> ModelSpec:
    """``name|weights`` (weights ``null``/``None``/empty: random) plus an optional checkpoint -> ModelSpec."""
    name, _, weights = str(key).partition("|")
    weights = None if weights.strip().lower() in ("", "null", "none") else weights.strip()
    checkpoint = str(checkpoint).strip() if checkpoint and str(checkpoint).strip() else None
    return ModelSpec(name.strip(), None if checkpoint else weights, checkpoint)


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` (or None): cuda when available, else cpu; otherwise the named device."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"unknown device {device!r}: {err}") from None


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the explorer.

    space: class space of the logits ("imagenet" or "digits"); classes: a name per logit.
    resize, crop: the preprocessing of its inputs. sites: gated call sites of one forward pass (every kind:
    ReLU, max-pool, SiLU, GELU, norm, attention), in order, with their call counts. layers: the sites that are
    modules with one output tensor (hidden-neuron targets). shapes: {layer: its output's shape (1, ...)};
    layouts: {layer: where its channels are} (:func:`output_layout`). kinds: the kinds of gated sites, in
    the order first called.
    """

    spec: ModelSpec
    model: nn.Module
    device: torch.device
    space: str
    classes: tuple[str, ...]
    resize: int
    crop: int
    sites: tuple[tuple[str, int], ...]
    layers: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()


def output_layout(shape: tuple[int, ...]) -> str:
    """Where the channels of a layer output of ``shape`` are, for :class:`~excitation_pullbacks.Neuron`:
    ``tokens`` for (N, L, C); for (N, A, B, C) of a square input ``channels_first`` when B == C (convolutions:
    (N, C, H, W)), ``channels_last`` when A == B != C (Swin and ConvNeXt blocks: (N, H, W, C)); else
    ``channels_first``."""
    if len(shape) == 3:
        return "tokens"
    if len(shape) == 4 and shape[2] != shape[3] and shape[1] == shape[2]:
        return "channels_last"
    return "channels_first"


def class_names_for(space: str, num_classes: int) -> tuple[str, ...]:
    """Names of ``num_classes`` logits in ``space`` (the core's class spaces); ``class i`` where they do not fit."""
    names = class_names(space)
    return names if len(names) == num_classes else tuple(f"class {i}" for i in range(num_classes))


_lock = threading.Lock()


def load_model(spec: ModelSpec, device: str | torch.device | None = "auto") -> LoadedModel:
    """Build (once; later calls return the cached one) the model ``spec`` names on ``device``.

    Raises ModelError with a one-line message for unknown names, unavailable weights, missing or
    mismatched checkpoints.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    stamp = None
    if spec.checkpoint:
        path = Path(os.path.expanduser(spec.checkpoint))
        if not path.is_file():
            raise ModelError(f"checkpoint {spec.checkpoint} does not exist")
        stamp = path.stat().st_mtime_ns  # a rewritten checkpoint is loaded again
    with _lock:
        return _load(spec, str(dev), stamp)


@lru_cache(maxsize=8)
def _load(spec: ModelSpec, device: str, stamp: int | None) -> LoadedModel:
    try:
        model = build_model(spec.name, spec.weights, checkpoint=spec.checkpoint)
    except WeightsUnavailableError as err:
        raise ModelError(str(err)) from None
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as err:
        text = " ".join(str(err).split())
        raise ModelError(f"cannot load {spec.label}: {text[:400]}") from None
    space = "digits" if spec.name == "digits_cnn" else "imagenet"
    resize, crop = (32, 32) if space == "digits" else (256, 224)
    return loaded_model(spec, model, device, space, resize, crop)


def _first_output(outputs: dict, name: str):
    """A forward hook that keeps the module's first output in ``outputs[name]`` and returns None, so the output
    the model goes on with is its own (a module called several times, as a ResNet block's ReLU, keeps each)."""

    def hook(_module, _args, out) -> None:
        outputs.setdefault(name, out)

    return hook


def loaded_model(spec: ModelSpec, model: nn.Module, device: str, space: str, resize: int, crop: int) -> LoadedModel:
    """``model`` (moved to ``device``, eval mode) described for the explorer: one forward pass of a zero image
    (1, 3, crop, crop) finds its gated sites, their output shapes and channel layouts, and its classes."""
    model = model.to(device).eval()
    probe = torch.zeros(1, 3, crop, crop, device=device)
    outputs: dict[str, object] = {}
    hooks = [m.register_forward_hook(_first_output(outputs, name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad(), excitation(model) as report:
            logits = model(probe)
    finally:
        for h in hooks:
            h.remove()
    sites = tuple((name, n) for kind in report.sites for name, n in report.of(kind).items())
    shapes = {
        name: tuple(outputs[name].shape)
        for name, _ in sites
        if isinstance(outputs.get(name), torch.Tensor) and outputs[name].dim() >= 2
    }
    layouts = {name: output_layout(shape) for name, shape in shapes.items()}
    classes = class_names_for(space, int(logits.shape[1]))
    return LoadedModel(
        spec,
        model,
        torch.device(device),
        space,
        classes,
        resize,
        crop,
        sites,
        tuple(shapes),
        shapes,
        layouts,
        tuple(report.sites),
    )
