"""The ``pullbacks ...`` command line (Hydra overrides) that reproduces the explorer's current settings."""

from __future__ import annotations

import shlex

from excitation_pullbacks import GateOptions

from .models import ModelSpec
from .panels import AscentSettings

__all__ = ["GATE_CONFIGS", "PRESET_CONFIGS", "command_line"]

#: Gate shapes with their own file in the ``gate`` config group; others are set through ``gate.shape``.
GATE_CONFIGS = ("sigmoid", "normal_cdf", "softsign", "hard", "none")
#: Presets with their own file in the ``gate`` config group (``paper`` is the group's defaults: any shape's file).
PRESET_CONFIGS = ("author", "semantic", "semantic_author")


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def command_line(
    spec: ModelSpec,
    *,
    gate: GateOptions,
    rules: str = "paper",
    ascent: AscentSettings,
    data_root: str,
    resize: int,
    crop: int,
    image_class: int,
    target_class: int,
    gpu: bool = False,
) -> str:
    """The pipeline run over the folder ``data_root`` (holding the image as ``0_<class index>.png``) with the
    same model, preprocessing, gate and ascent settings, and the image's class as the row and
    ``target_class`` as a column of the figures (indices of the model's class space).

    ``gate`` is the preset ``rules`` with its shape, T, max-pool T and detach set (as the gate panel makes it):
    the command names the preset (``gate=semantic``; for ``paper`` the shape's file or ``gate.shape``) and
    those four fields."""
    args = [f"model={spec.name}"]
    if spec.checkpoint:
        args += ["model.weights=null", f"model.checkpoint={spec.checkpoint}"]
    else:
        args.append(f"model.weights={_value(spec.weights)}")
    args += ["data=folder", f"data.root={data_root}", f"data.resize={resize}", f"data.crop={crop}"]
    if rules in PRESET_CONFIGS:
        args += [f"gate={rules}", f"gate.shape={gate.gate}"]
    elif rules == "paper":
        args.append(f"gate={gate.gate}" if gate.gate in GATE_CONFIGS else f"gate.shape={gate.gate}")
    else:
        raise ValueError(f"no gate config for rules {rules!r}; choose paper or one of {', '.join(PRESET_CONFIGS)}")
    args += [
        f"gate.temperature={_value(float(gate.temperature))}",
        f"gate.pool_temperature={_value(None if gate.pool_temperature is None else float(gate.pool_temperature))}",
        f"gate.pool_detach={_value(bool(gate.pool_detach))}",
        f"ascent.steps={int(ascent.steps)}",
        f"ascent.step_size={_value(float(ascent.step_size))}",
        f"ascent.eps={_value(float(ascent.eps))}",
        "targets=custom",
        f"targets.rows=[{int(image_class)}]",
        f"targets.extra=[{int(target_class)}]" if int(target_class) != int(image_class) else "targets.extra=[]",
        "logger=csv",
    ]
    if gpu:
        args.append("trainer=gpu")
    return "pullbacks " + " ".join(shlex.quote(a) for a in args)
