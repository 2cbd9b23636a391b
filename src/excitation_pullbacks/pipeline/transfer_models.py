"""The evaluate task's transfer models: the other models each counterfactual is scored on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from excitation_pullbacks import build_model

from .errors import PipelineError

__all__ = ["transfer_models"]


def transfer_models(entries, weights, seed: int) -> dict[str, nn.Module]:
    """evaluate.transfer_models -> {label: model}. An entry is a model name (built with the run's weights
    setting) or a mapping {name, weights, checkpoint, label} (e.g. a second digits_cnn from its own
    checkpoint); labels must differ."""
    models: dict[str, nn.Module] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, w, ckpt, label = entry, weights, None, entry
        else:
            entry = dict(entry)
            if "name" not in entry:
                raise PipelineError(f"evaluate.transfer_models entry {entry} needs a name")
            name, w, ckpt = str(entry["name"]), entry.get("weights", weights), entry.get("checkpoint")
            label = str(entry.get("label") or (f"{name}:{Path(str(ckpt)).stem}" if ckpt else name))
        if label in models:
            raise PipelineError(f"evaluate.transfer_models names {label!r} twice; give each entry a label")
        torch.manual_seed(seed)  # random weights (weights=null) are reproducible
        models[label] = build_model(name, w, checkpoint=ckpt)
    return models
