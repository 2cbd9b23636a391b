"""Golden outputs: seeded CPU runs of the digits figures and evaluate tasks give the committed key numbers.

A refactor that changes any result (a pullback, an ascent step, a metric) fails here. After a change that is
meant to change results, regenerate the file and say why in the commit:

    python tests/test_golden.py --update
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from excitation_pullbacks.pipeline.run import run

from helpers import compose_config

GOLDEN = Path(__file__).parent / "golden" / "digits.json"
FIGURES = ["experiment=digits", "logger=none", "ascent.steps=4", "ascent.fig1_steps=2", "targets.rows=[0,3,8]"]
EVALUATE = [
    "experiment=evaluate_digits",
    "logger=none",
    "evaluate.num_images=6",
    "evaluate.randomization_images=2",
    "evaluate.perturbation_steps=8",
    "baselines.smoothgrad_samples=4",
    "baselines.ig_steps=8",
    "ascent.steps=3",
    "temperatures=[0.1,0.3,1.0]",
    "evaluate.transfer_models=[digits_cnn]",
]
RTOL, ATOL = 1e-4, 1e-6


def _stats(t: torch.Tensor) -> dict[str, float | list[float]]:
    """A tensor's sum, absolute sum, min, max and its first and last four entries."""
    f = t.double().flatten()
    return {
        "sum": float(f.sum()),
        "abs_sum": float(f.abs().sum()),
        "min": float(f.min()),
        "max": float(f.max()),
        "first": f[:4].tolist(),
        "last": f[-4:].tolist(),
    }


def _numbers(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def key_numbers(figures: Path, evaluate: Path) -> dict:
    """The key numbers of the two runs' ``results`` folders: statistics of every tensor in tensors.pt, every
    row of metrics.csv and of the evaluate task's metric table."""
    tensors = torch.load(figures / "tensors.pt", weights_only=True)
    with open(figures / "metrics.csv", newline="") as f:
        metrics = [{k: _numbers(v) for k, v in r.items()} for r in csv.DictReader(f)]
    with open(evaluate / "metrics_table.csv", newline="") as f:
        table = [{k: _numbers(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {
        "figures": {
            "tensors": {k: _stats(v) for k, v in sorted(tensors.items()) if isinstance(v, torch.Tensor)},
            "metrics_csv": metrics,
        },
        "evaluate": {"metrics_table": table},
    }


def compute(tmp: Path) -> dict:
    a = run(compose_config(*FIGURES, f"output_dir={tmp / 'figures'}"))["results"]
    b = run(compose_config(*EVALUATE, f"output_dir={tmp / 'evaluate'}"))["results"]
    return key_numbers(a, b)


def _compare(got, want, path: str, problems: list[str]) -> None:
    if isinstance(want, dict):
        if set(got) != set(want):
            problems.append(f"{path}: keys {sorted(set(got) ^ set(want))} differ")
        for k in want:
            if k in got:
                _compare(got[k], want[k], f"{path}/{k}", problems)
    elif isinstance(want, list):
        if len(got) != len(want):
            problems.append(f"{path}: {len(got)} entries, expected {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{path}[{i}]", problems)
    elif isinstance(want, float):
        if not (
            isinstance(got, float)
            and (math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(got) and math.isnan(want)))
        ):
            problems.append(f"{path}: {got!r} != {want!r}")
    elif got != want:
        problems.append(f"{path}: {got!r} != {want!r}")


@pytest.fixture(scope="module")
def numbers(tmp_path_factory):
    return compute(tmp_path_factory.mktemp("golden"))


def test_seeded_runs_give_the_committed_numbers(numbers):
    problems: list[str] = []
    _compare(json.loads(json.dumps(numbers)), json.loads(GOLDEN.read_text()), "", problems)
    assert not problems, f"{len(problems)} numbers differ from {GOLDEN.name}:\n" + "\n".join(problems[:20])


def test_the_comparison_notices_a_changed_number(numbers):
    changed = json.loads(json.dumps(numbers))
    changed["figures"]["tensors"]["excitation"]["sum"] *= 1 + 10 * RTOL
    problems: list[str] = []
    _compare(changed, json.loads(GOLDEN.read_text()), "", problems)
    want = json.loads(GOLDEN.read_text())["figures"]["tensors"]["excitation"]["sum"]
    assert problems == [
        f"/figures/tensors/excitation/sum: {changed['figures']['tensors']['excitation']['sum']!r} != {want!r}"
    ]


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_golden.py --update")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(compute(Path(tmp)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
