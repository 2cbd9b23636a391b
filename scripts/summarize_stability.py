"""Summarise path-stability runs across seeds: the rho(t_pi, t) matrices and controls, mean and spread.

    .venv/bin/python scripts/summarize_stability.py [multirun/path_stability]

Reads ``<dir>/*/results/stability.json`` (one per seed, from ``pullbacks -m experiment=path_stability``) and
prints, per matrix, the mean over runs with the smallest and largest value per cell, and the time each run took.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

MATRICES = ("rho_pooled", "rho_class_mean", "rho_control_pooled", "accuracy", "accuracy_control")
CURVES = ("path_rho_mean", "control_path_rho_mean")


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "multirun/path_stability")
    runs = sorted(root.glob("*/results/stability.json"))
    if not runs:
        print(f"no stability.json under {root}/*/results", file=sys.stderr)
        return 1
    data = [json.loads(p.read_text()) for p in runs]
    np.set_printoptions(precision=3, suppress=True, linewidth=180)
    print(f"{len(runs)} runs: {', '.join(p.parent.parent.name for p in runs)}; steps {data[0]['steps']}")
    for p in runs:
        timing = json.loads((p.parent / "timing.json").read_text())
        print(f"  {p.parent.parent.name}: {timing['total_s']:.0f} s")
    for key in MATRICES + CURVES + ("rho_f_soft",):
        stack = np.array([np.array(d[key], dtype=float) for d in data])
        print(f"\n{key}: mean over runs (rows t_pi, or temperatures {data[0]['temperatures']} for the curves)")
        print(np.nanmean(stack, 0))
        print("  min over runs:")
        print(np.nanmin(stack, 0))
        print("  max over runs:")
        print(np.nanmax(stack, 0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
