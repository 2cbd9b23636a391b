"""The evaluate table's rows: each attribution method, and excitation pullbacks at each gate setting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from excitation_pullbacks.baselines import METHODS

from .errors import PipelineError
from .schedules import GateSetting

__all__ = ["MethodSetting", "method_settings"]


@dataclass
class MethodSetting:
    """One table row: its label, the attribution method, the gate setting (excitation rows; None for
    baselines), the explainer's options, and whether counterfactuals are made along it."""

    label: str
    method: str
    gate: GateSetting | None
    options: dict
    ascent: bool = False

    @property
    def temperature(self) -> str:
        """The table's temperature column: the gate setting's T, '' for baselines and per-channel gates."""
        return "" if self.gate is None or self.gate.temperature is None else self.gate.label


def method_settings(
    ev, baselines: dict, gates: Sequence[GateSetting], depth: Sequence[float] | None = None
) -> list[MethodSetting]:
    """The table's rows: the baselines of ``ev.methods`` (Captum options ``baselines``), then excitation
    pullbacks at each gate setting. depth: the by-depth temperatures, named in the row labels."""
    unknown = [m for m in ev.methods if m not in METHODS]
    if unknown:
        raise PipelineError(f"unknown method(s) {', '.join(map(str, unknown))}; choose from {', '.join(METHODS)}")
    asc = set(ev.ascent_methods)
    rows = [MethodSetting(m, m, None, dict(baselines), m in asc) for m in ev.methods if m != "excitation"]
    if "excitation" in ev.methods:
        for g in gates:
            label = "excitation calibrated" if g.temperature is None else f"excitation T={g.label}"
            if depth:
                label += f" depth {'/'.join(f'{float(d):g}' for d in depth)}"
            rows.append(
                MethodSetting(label, "excitation", g, dict(baselines, schedule=g.schedule), "excitation" in asc)
            )
    if not rows:
        raise PipelineError("evaluate.methods is empty")
    return rows
