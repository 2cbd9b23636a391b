"""Widget values -> the arguments of the explorer's computations: the gate (a preset's rules with the gate
panel's fields), temperatures, max-pool T, hidden neurons (position or token), class choices; each bad value is a
ValueError with a one-line message the page shows."""

from __future__ import annotations

import math
import re

from excitation_pullbacks import GateOptions, Neuron, preset

from .images import image_label
from .models import LoadedModel

__all__ = [
    "PAPER_SIZE",
    "RULES",
    "ascent_defaults",
    "class_choices",
    "class_index",
    "label_class",
    "parse_pool_temperature",
    "parse_position",
    "parse_temperatures",
    "parse_token",
    "preset_fields",
    "rules_gate",
    "target_neuron",
]

PAPER_SIZE = 224  # the paper's ascent budget (step 20, eps 100) is for 224 x 224 images; scaled by crop / 224

#: The presets the gate panel's "Rules" offers (``excitation_pullbacks.PRESETS`` but the vanilla gradient, which
#: the page shows beside every pullback anyway).
RULES = ("paper", "semantic", "author", "semantic_author")


def preset_fields(name: str) -> tuple[str, float, str, bool]:
    """The gate panel's fields (shape, T, max-pool T as text, detach) that show the preset ``name``."""
    options = preset(name)
    detach = options.pool_detach if options.pool_detach is not None else options.compat == "semantic_author"
    pool = "" if options.pool_temperature is None else f"{float(options.pool_temperature):g}"
    return options.gate, float(options.temperature), pool, bool(detach)


def rules_gate(rules: str, shape: str, temperature: float, pool_temperature, pool_detach: bool) -> GateOptions:
    """The preset ``rules`` with the gate panel's fields: ``preset(rules).replace(temperature=..., gate=shape,
    pool_temperature=..., pool_detach=...)`` (the preset's other rules - SiLU, GELU, norm, attention, compat -
    as they are). ValueError for an unknown preset or a bad field."""
    if rules not in RULES:
        raise ValueError(f"unknown rules {rules!r}; choose one of {', '.join(RULES)}")
    return preset(rules).replace(
        temperature=float(temperature),
        gate=str(shape),
        pool_temperature=parse_pool_temperature(pool_temperature),
        pool_detach=bool(pool_detach),
    )


def parse_temperatures(text: str) -> list[float]:
    """``"0, 0.1, 0.3"`` -> [0.0, 0.1, 0.3]; 1 to 8 finite values >= 0, else ValueError."""
    try:
        values = [float(v) for v in re.split(r"[,\s]+", str(text).strip()) if v]
    except ValueError:
        raise ValueError(f"temperatures must be numbers separated by commas, got {text!r}") from None
    if not 1 <= len(values) <= 8 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"give 1 to 8 temperatures >= 0 (0: vanilla gradient), got {text!r}")
    return values


def parse_pool_temperature(text) -> float | None:
    """``""``/None -> None (the ReLU temperature); a number >= 0 -> float; else ValueError."""
    if text is None or not str(text).strip() or str(text).strip().lower() in ("null", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"max-pool T must be a number >= 0 or blank, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"max-pool T must be a number >= 0 or blank, got {text!r}")
    return value


def parse_position(text: str | None) -> tuple[int, int] | None:
    """``""`` -> None (sum over positions); ``"3, 4"`` -> (3, 4); else ValueError."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in re.split(r"[,\s]+", str(text).strip().strip("()")) if p]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"position must be two row, column numbers such as 3, 4 (or blank), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_token(text) -> int | None:
    """``""``/None -> None (sum over tokens); ``"0"`` -> 0 (e.g. a ViT's class token); else ValueError."""
    if text is None or not str(text).strip():
        return None
    value = str(text).strip()
    if not value.lstrip("-").isdigit():
        raise ValueError(f"token must be a whole number such as 0 (or blank: sum over tokens), got {text!r}")
    return int(value)


def target_neuron(loaded: LoadedModel, layer, channel, position, token) -> Neuron:
    """The hidden neuron the page's fields name: a (h, w) ``position`` for layers with spatial outputs, a
    ``token`` for layers with (N, L, C) outputs (blank: the sum); the layer's channel layout from the model's
    probe (:func:`~excitation_pullbacks.app.models.output_layout`). ValueError for a field that does not fit."""
    if not layer:
        raise ValueError("pick a layer for the hidden neuron")
    layer = str(layer)
    layout = loaded.layouts.get(layer, "auto")
    where, tok = parse_position(position), parse_token(token)
    shape = loaded.shapes.get(layer)
    if layout == "tokens" and where is not None:
        raise ValueError(f"layer {layer} outputs tokens {shape}: give a token (or blank), not a position")
    if layout != "tokens" and tok is not None:
        raise ValueError(f"layer {layer} outputs {shape} ({layout}): give a position h, w (or blank), not a token")
    return Neuron(layer, int(channel or 0), where, layout=layout, token=tok)


def class_choices(loaded: LoadedModel) -> list[str]:
    """The class dropdown's choices: ``name (index)`` for every logit."""
    return [f"{name} ({i})" for i, name in enumerate(loaded.classes)]


def class_index(choice, loaded: LoadedModel) -> int:
    """A dropdown value ``name (i)``, an index or a class name -> index of the model's classes."""
    text = str(choice).strip() if choice is not None else ""
    m = re.search(r"\((\d+)\)\s*$", text)
    if m:
        i = int(m.group(1))
    elif text.isdigit():
        i = int(text)
    else:
        key = text.lower()
        i = next((j for j, n in enumerate(loaded.classes) if n.lower() == key), -1)
        if i < 0:
            raise ValueError(f"unknown class {choice!r}: pick one from the list")
    if not 0 <= i < len(loaded.classes):
        raise ValueError(f"class index {i} is out of range 0..{len(loaded.classes) - 1}")
    return i


def label_class(path: str | None, loaded: LoadedModel) -> int | None:
    """The class an image's file name names (``3_chain_saw.jpg``), or None."""
    if not path:
        return None
    name = image_label(path).lower()
    return next((j for j, n in enumerate(loaded.classes) if n.lower() == name), None)


def ascent_defaults(loaded: LoadedModel) -> tuple[float, float]:
    """The paper's step size 20 and radius 100 scaled to the model's crop (same per-pixel RMS change)."""
    scale = loaded.crop / PAPER_SIZE
    return round(20.0 * scale, 3), round(100.0 * scale, 2)
