"""The figures task's tables: metrics.csv (one row per image x target x method) and the per-(method, T)
aggregates of metrics_table.csv, the run's summary scalars and the per-T records."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from excitation_pullbacks.metrics import high_frequency_energy, total_variation

from ..atomic import write_text
from ..schedules import VANILLA, GateSetting

__all__ = ["TABLE_METRICS", "by_temperature", "method_table", "summary", "write_metrics_csv"]


def write_metrics_csv(
    path: Path, merged: dict[str, Tensor], columns: Sequence[int], labels: Sequence[str], names: Sequence[str]
) -> list[list]:
    """metrics.csv: one row per image x target x method (excitation at each setting, vanilla). Returns the
    header and rows ("" where there was no ascent)."""
    header = [
        "row",
        "dataset_index",
        "label",
        "label_name",
        "target",
        "target_name",
        "method",
        "temperature",
        "logit_before",
        "top1_before",
        "top1_before_name",
        "logit_after",
        "top1_after",
        "top1_after_name",
        "hit_after",
    ]
    rows = []
    has_ascent = "exc_ascent" in merged
    for i in range(merged["images"].shape[0]):
        base = [int(merged["row"][i]), int(merged["index"][i]), int(merged["label"][i]), names[int(merged["label"][i])]]
        top_b = int(merged["top1_before"][i])
        for k, c in enumerate(columns):
            before = [float(merged["logit_before"][i, k]), top_b, names[top_b]]
            methods = [("excitation", lab, j) for j, lab in enumerate(labels)] + [("vanilla", VANILLA.label, None)]
            for method, temp, j in methods:
                if has_ascent:
                    if j is None:
                        la, ta = float(merged["van_logit_after"][i, k]), int(merged["van_top1_after"][i, k])
                    else:
                        la, ta = float(merged["exc_logit_after"][i, j, k]), int(merged["exc_top1_after"][i, j, k])
                    after = [la, ta, names[ta], int(ta == c)]
                else:
                    after = ["", "", "", ""]
                rows.append(base + [c, names[c], method, temp] + before + after)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_text(path, buf.getvalue())
    return [header, *rows]


#: The per-(method, T) aggregates of the figures task: what metrics_table.csv and the dashboard hold.
TABLE_METRICS = {
    "logit_before": "mean target logit of the images",
    "logit_after": "mean target logit after the ascent along the method's maps",
    "logit_gain": "mean target-logit gain of the ascent (after - before)",
    "hit_rate": "fraction of ascents whose top-1 class became the target",
    "map_hf_energy": "mean fraction of the map's spectral energy above half the Nyquist radius; lower: smoother",
    "map_tv": "mean normalised total variation of the map; lower: smoother",
}


def method_table(
    merged: dict[str, Tensor],
    columns: Sequence[int],
    settings: Sequence[GateSetting],
    variants: Sequence[str] = (),
    main: int | None = None,
) -> list[dict]:
    """One row per method - excitation at each gate setting, then vanilla, then each pullback variant (at
    ``settings[main]``) - with the means over images x targets of :data:`TABLE_METRICS` (the ascent's only
    where there was one, not for the variants). merged: the predictions (excitation (N, S, K, C, H, W),
    vanilla (N, K, C, H, W), variants (N, V, K, C, H, W), logits and top-1 before/after)."""
    target = torch.tensor(list(columns))
    methods = [("excitation", s.label, s.temperature, j) for j, s in enumerate(settings)]
    methods.append(("vanilla", VANILLA.label, None, None))
    if variants:
        s = settings[0 if main is None else main]
        methods += [(name, s.label, s.temperature, v) for v, name in enumerate(variants)]
    rows = []
    for method, label, temperature, j in methods:
        has_ascent = "exc_ascent" in merged and method in ("excitation", "vanilla")
        if method in ("excitation", "vanilla"):
            maps = merged["vanilla"] if j is None else merged["excitation"][:, j]
        else:
            maps = merged["variants"][:, j]
        flat = maps.flatten(0, 1).double()  # (N*K, C, H, W)
        row = {
            "method": method,
            "setting": label,
            "temperature": "" if temperature is None else float(temperature),
            "n": int(flat.shape[0]),
            "logit_before": float(merged["logit_before"].double().mean()),
        }
        if has_ascent:
            after = merged["van_logit_after"] if j is None else merged["exc_logit_after"][:, j]
            top1 = merged["van_top1_after"] if j is None else merged["exc_top1_after"][:, j]
            row["logit_after"] = float(after.double().mean())
            row["logit_gain"] = float((after.double() - merged["logit_before"].double()).mean())
            row["hit_rate"] = float((top1 == target).double().mean())
        row["map_hf_energy"] = float(high_frequency_energy(flat).mean())
        row["map_tv"] = float(total_variation(flat).mean())
        rows.append(row)
    return rows


def _metric_keys(row: dict) -> list[str]:
    return [k for k in TABLE_METRICS if k in row]


def summary(rows: list[dict], main: int | None) -> dict[str, float]:
    """The run's scalars: ``excitation/<metric>`` at the main setting (the one at gate.temperature; none
    when the run has no main setting), ``vanilla/<metric>`` and ``<variant>/<metric>`` for each variant."""
    out: dict[str, float] = {}
    for i, r in enumerate(rows):
        if r["method"] != "excitation" or i == main:
            out.update({f"{r['method']}/{k}": r[k] for k in _metric_keys(r)})
    return out


def by_temperature(rows: list[dict]) -> list[dict]:
    """The excitation rows with a numeric T as per-T records of the metrics that depend on T (vanilla is in
    the summary: it has no T; logit_before is the same at every T)."""
    return [
        {
            "method": "excitation",
            "temperature": r["temperature"],
            **{k: r[k] for k in _metric_keys(r) if k != "logit_before"},
        }
        for r in rows
        if r["method"] == "excitation" and r["temperature"] != ""
    ]
