"""Gate config -> the run's gate settings: every ``Schedule`` the pipeline uses is built here.

A :class:`GateSetting` is one setting a run computes pullbacks and ascent at (a figure row, a table row):
a label (``0.3``, ``calibrated``), the temperature it stands for (None for per-channel gates) and its schedule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from excitation_pullbacks import calibrate, excitation
from excitation_pullbacks.gates import Gate
from excitation_pullbacks.options import GateOptions, make_schedule
from excitation_pullbacks.schedules import ByDepth, PerChannel, Schedule

from .config import GateKind
from .errors import PipelineError

__all__ = [
    "VANILLA",
    "GateSetting",
    "check_main_temperature",
    "check_temperatures",
    "gate_options",
    "gate_settings",
    "main_setting",
    "run_gate_settings",
]


@dataclass(frozen=True)
class GateSetting:
    """label: how tables and figures name the setting (``f"{T:g}"``, or ``calibrated``); temperature: the
    setting's T (None for per-channel gates); schedule: the gates."""

    label: str
    temperature: float | None
    schedule: Schedule


#: The vanilla gradient: hard gates everywhere (native ops only, bit for bit the plain input gradient).
VANILLA = GateSetting("0", 0.0, make_schedule(temperature=0.0, gate="hard"))


def check_temperatures(temperatures: Sequence) -> list[float]:
    """``temperatures`` of a run config -> floats; PipelineError unless a non-empty list of numbers >= 0."""
    temps = list(temperatures)
    ok = temps and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0 for t in temps
    )
    if not ok:
        raise PipelineError(f"temperatures must be a non-empty list of numbers >= 0, got {temps}")
    return [float(t) for t in temps]


def gate_options(gate, temperature: float) -> GateOptions:
    """The core's :class:`~excitation_pullbacks.options.GateOptions` of a ``gate`` config node at ``temperature``
    (the config's fields are GateOptions' own, ``shape`` for ``gate``)."""
    names = {f.name for f in fields(GateOptions)} - {"gate", "temperature"}
    values = {name: getattr(gate, name) for name in names if name in gate}
    values = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
    return GateOptions(temperature=temperature, gate=gate.shape.value, **values)


def _uniform(gate, temperature: float) -> Schedule:
    return gate_options(gate, temperature).schedule()


def _by_depth(gate, temperature: float, relu_calls: int) -> Schedule:
    """ReLU calls in len(depth_temperatures) equal depth groups (input side first), group g at
    depth_temperatures[g]; other sites as the uniform schedule at ``temperature`` sets them."""
    gates = [Gate(gate.shape.value, float(t)) for t in gate.depth_temperatures]
    n = max(relu_calls, 1)
    return ByDepth(lambda d: gates[min(d * len(gates) // n, len(gates) - 1)], default=_uniform(gate, temperature))


def relu_calls(model: nn.Module, example: Tensor) -> int:
    """ReLU calls in one forward pass of ``model`` on ``example`` (1, C, H, W)."""
    with excitation(model, temperature=0.0, gate="hard") as report, torch.no_grad():
        model(example)
    return report.relu_calls


def gate_settings(
    gate,
    temperatures: Sequence[float],
    *,
    model: nn.Module,
    example: Tensor,
    batches: Callable[[], Iterable[Tensor]] | None = None,
    save_to: Path | None = None,
) -> list[GateSetting]:
    """The run's gate settings from its ``gate`` config (a :class:`~.config.GateConfig` node).

    uniform / by_depth: one setting per temperature. calibrated: one setting, ``calibrated``, read from
    ``gate.calibration`` or calibrated now on ``batches()`` (image batches (B, C, H, W)) and saved to
    ``save_to`` when given. example: (1, C, H, W), counts the ReLU calls for ``by_depth``.
    """
    kind = GateKind(gate.kind)
    if kind == GateKind.calibrated:
        fallback = _uniform(gate, float(gate.temperature))
        if gate.calibration:
            path = Path(os.path.expanduser(str(gate.calibration)))
            if not path.is_file():
                raise PipelineError(f"calibration file {path} does not exist (gate.calibration=null calibrates now)")
            schedule = PerChannel.load(path, default=fallback)
        else:
            if batches is None:
                raise PipelineError("gate=calibrated needs data to calibrate on, or gate.calibration=<file>")
            schedule = calibrate(
                model, batches(), scale=float(gate.calibration_scale), shape=gate.shape.value, default=fallback
            )
            if save_to is not None:
                schedule.save(save_to)
        return [GateSetting("calibrated", None, schedule)]
    if kind == GateKind.by_depth:
        if not gate.depth_temperatures:
            raise PipelineError("gate.kind=by_depth needs gate.depth_temperatures, e.g. [0.15,0.3,0.5]")
        check_temperatures(gate.depth_temperatures)
        n = relu_calls(model, example)
        return [GateSetting(f"{t:g}", t, _by_depth(gate, t, n)) for t in temperatures]
    return [GateSetting(f"{t:g}", t, _uniform(gate, t)) for t in temperatures]


def check_main_temperature(gate, temperatures: Sequence[float]) -> None:
    """PipelineError unless ``gate.temperature`` is one of ``temperatures`` (per-channel gates need not be)."""
    if GateKind(gate.kind) != GateKind.calibrated and float(gate.temperature) not in temperatures:
        raise PipelineError(
            f"gate.temperature={float(gate.temperature):g} is not one of temperatures "
            f"[{', '.join(f'{t:g}' for t in temperatures)}]: add it, or set gate.temperature to one "
            f"of them"
        )


def run_gate_settings(
    cfg, model: nn.Module, dataset, example: Tensor, *, save_to: Path | None = None
) -> list[GateSetting]:
    """The gate settings of a run config: :func:`gate_settings` at ``cfg.temperatures``; per-channel gates
    calibrate on the first ``cfg.gate.calibration_batches`` batches (``cfg.batch_size`` images) of a shuffle
    of ``dataset`` seeded by ``cfg.seed``."""

    def batches() -> Iterable[Tensor]:
        loader = DataLoader(
            dataset,
            batch_size=int(cfg.batch_size),
            shuffle=True,
            generator=torch.Generator().manual_seed(int(cfg.seed)),
        )
        return (b[0] for _, b in zip(range(int(cfg.gate.calibration_batches)), loader))

    return gate_settings(
        cfg.gate, check_temperatures(cfg.temperatures), model=model, example=example, batches=batches, save_to=save_to
    )


def main_setting(settings: Sequence[GateSetting], gate) -> int:
    """Index of the setting figures draw and objectives read: the only one for per-channel gates, else the one
    at ``gate.temperature`` (PipelineError when ``temperatures`` lacks it)."""
    if len(settings) == 1 and settings[0].temperature is None:
        return 0
    for i, s in enumerate(settings):
        if s.temperature == float(gate.temperature):
            return i
    raise PipelineError(
        f"gate.temperature={float(gate.temperature):g} is not one of temperatures "
        f"[{', '.join(s.label for s in settings)}]: add it, or set gate.temperature to one of them"
    )
