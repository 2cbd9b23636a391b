"""The ablation table: every one-at-a-time setting's per-image scores minus the default job's on the same
images, with bootstrap intervals, read from the finished jobs' results of a multirun (any job order).

A job is a ``published_table`` run whose ``config.yaml`` holds ``ablation.setting`` (``default`` or
``<parameter>@<value>``, :mod:`..ablation_settings`); its ``per_image.csv`` holds one row per image and method.
Scores are paired by dataset index, per method and metric; the bootstrap settings are the default job's
``published.bootstrap``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..ablation_settings import parse_setting
from ..errors import PipelineError
from ..manifest import MANIFEST
from .paired import bootstrap_options, difference

__all__ = ["METRICS", "AblationJob", "ablation_rows", "markdown", "read_jobs"]

#: Score columns of per_image.csv and which way is better (the published table's columns).
METRICS = {
    "infidelity": "lower",
    "faithfulness_correlation": "higher",
    "faithfulness_estimate": "higher",
    "monotonicity_correlation": "higher",
    "max_sensitivity": "lower",
    "random_logit": "lower",
    "focus": "higher",
}
#: Config entries that must be equal in every job for their images and scores to be paired.
SAME = ("model", "data", "targets", "seed")


@dataclass
class AblationJob:
    """One finished job: its folder, setting, parameter and value (None for the default), resolved config and
    scores {method: {dataset index: {metric: value}}} (NaN where a metric was not computed)."""

    folder: Path
    setting: str
    parameter: str | None
    value: object
    config: dict
    scores: dict[str, dict[int, dict[str, float]]]


def _score(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def read_jobs(sweep_dir: Path) -> list[AblationJob]:
    """The complete ablation jobs under ``sweep_dir`` (``<job>/results`` with a manifest, a config holding
    ``ablation`` and a per_image.csv), sorted by folder name. Raises PipelineError when two jobs claim one
    setting."""
    jobs: dict[str, AblationJob] = {}
    for results in sorted(Path(sweep_dir).glob("*/results")):
        config_file, per_image = results / "config.yaml", results / "per_image.csv"
        if not ((results / MANIFEST).is_file() and config_file.is_file() and per_image.is_file()):
            continue
        config = yaml.safe_load(config_file.read_text())
        ablation = config.get("ablation") if isinstance(config, dict) else None
        if not ablation:
            continue
        setting = str(ablation["setting"])
        parsed = parse_setting(setting, ablation["defaults"])
        scores: dict[str, dict[int, dict[str, float]]] = {}
        with per_image.open(newline="") as f:
            for row in csv.DictReader(f):
                scores.setdefault(row["method"], {})[int(row["dataset_index"])] = {
                    m: _score(row.get(m, "")) for m in METRICS
                }
        if setting in jobs:
            raise PipelineError(
                f"two jobs under {sweep_dir} ran ablation setting {setting}: {jobs[setting].folder.parent.name} and "
                f"{results.parent.name}; give the multirun its own hydra.sweep.dir"
            )
        parameter, value = parsed if parsed is not None else (None, None)
        jobs[setting] = AblationJob(results.parent, setting, parameter, value, config, scores)
    return sorted(jobs.values(), key=lambda j: j.folder.name)


def ablation_rows(jobs: list[AblationJob]) -> list[dict]:
    """One row per (setting, method, metric): the setting's mean, the default's mean on the paired images, and
    the mean setting - default difference with its bootstrap interval (the default job's
    ``published.bootstrap``). Ordered by parameter (``ablation.defaults``' order), value, method (the default
    job's ``published.methods`` order), metric, whatever order the jobs ran in. Raises PipelineError without a default job or when a job's model, data,
    targets or seed differ from the default's."""
    default = next((j for j in jobs if j.parameter is None), None)
    if default is None:
        raise PipelineError("no finished default job (ablation.setting=default): nothing to compare with")
    for job in jobs:
        differing = [k for k in SAME if job.config.get(k) != default.config.get(k)]
        if differing:
            raise PipelineError(
                f"job {job.folder.name} differs from the default job in {', '.join(differing)}: its scores cannot be "
                f"paired with the default's"
            )
    options = bootstrap_options(default.config["published"].get("bootstrap"))
    order = list(default.config["ablation"]["defaults"])
    rows = []
    others = [j for j in jobs if j.parameter is not None]
    for job in sorted(others, key=lambda j: (order.index(j.parameter), float(j.value))):
        base_value = default.config["ablation"]["defaults"][job.parameter]
        listed = [str(m) for m in default.config["published"].get("methods") or []]
        for method in sorted(job.scores, key=lambda m: listed.index(m) if m in listed else len(listed)):
            by_image = job.scores[method]
            if method not in default.scores:
                raise PipelineError(f"job {job.folder.name} scored {method}, which the default job did not score")
            reference = default.scores[method]
            images = sorted(set(by_image) & set(reference))
            for metric, better in METRICS.items():
                a = [by_image[i][metric] for i in images]
                b = [reference[i][metric] for i in images]
                if not any(math.isfinite(v) for v in a):
                    continue
                d = difference(a, b, options)
                both = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
                rows.append(
                    {
                        "parameter": job.parameter,
                        "value": job.value,
                        "default": base_value,
                        "method": method,
                        "metric": metric,
                        "better": better,
                        "setting_mean": sum(x for x, _ in both) / len(both) if both else math.nan,
                        "default_mean": sum(y for _, y in both) / len(both) if both else math.nan,
                        **d,
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table: one line per (parameter, value, method), one column per metric with the
    mean difference setting - default and its interval; ``*`` marks an interval that excludes 0."""
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    if not rows:
        return "no ablation rows\n"
    conf, resamples = rows[0]["confidence"], rows[0]["resamples"]
    title = (
        f"Paired differences setting - default (mean [{100 * conf:g}% bootstrap interval, {resamples} resamples]; "
        f"* the interval excludes 0; n = {rows[0]['n']} images)"
    )
    lines = [
        title,
        "",
        "| parameter | value | default | method | " + " | ".join(f"{m} ({METRICS[m]} better)" for m in metrics) + " |",
        "|" + "---|" * (4 + len(metrics)),
    ]
    keys = list(dict.fromkeys((r["parameter"], r["value"], r["method"]) for r in rows))
    cells = {(r["parameter"], r["value"], r["method"], r["metric"]): r for r in rows}
    for p, v, method in keys:
        out = []
        for m in metrics:
            r = cells.get((p, v, method, m))
            if r is None or not math.isfinite(r["mean"]):
                out.append("")
                continue
            mark = "*" if r["low"] > 0 or r["high"] < 0 else ""
            out.append(f"{r['mean']:+.3g} [{r['low']:.3g}, {r['high']:.3g}]{mark}")
        default = next(r["default"] for r in rows if r["parameter"] == p)
        lines.append(f"| {p} | {v:g} | {default:g} | {method} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"
