"""The evaluate task's tables: mean and standard error per row, per-image rows, randomization curves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..evaluate_metrics import is_metric
from ..method_settings import MethodSetting

__all__ = ["mean_sem", "per_image_table", "randomization_means", "summary_table"]


def mean_sem(v: Tensor) -> tuple[float | str, float | str]:
    """Mean and standard error over the finite entries of v (N,); ("", "") when there are none."""
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return "", ""
    sem = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), sem


def _nanmean0(v: Tensor) -> list[float]:
    """(N, L) with NaN rows -> mean over the finite rows, (L,) as a list."""
    keep = ~torch.isnan(v).any(1)
    return v[keep].mean(0).tolist() if keep.any() else []


def randomization_means(curves: Tensor, rows: Sequence[MethodSetting], layers: Sequence[str]) -> dict:
    """curves (N, J, 2, L): Spearman and SSIM per image, row and randomised layer (NaN for unchecked images)
    -> {"layers", "spearman": {row label: (L,) mean over the checked images}, "ssim": {...}}."""
    return {
        "layers": list(layers),
        "spearman": {r.label: _nanmean0(curves[:, i, 0]) for i, r in enumerate(rows)},
        "ssim": {r.label: _nanmean0(curves[:, i, 1]) for i, r in enumerate(rows)},
    }


def summary_table(model: str, rows: Sequence[MethodSetting], merged: dict) -> list[dict]:
    """One dict per table row: model, setting, method, temperature, n_images, and the mean and standard error
    of every per-image metric column of ``merged`` (N, J)."""
    metric_keys = [k for k in merged if is_metric(k)]
    table = []
    for i, s in enumerate(rows):
        row = {
            "model": model,
            "setting": s.label,
            "method": s.method,
            "temperature": s.temperature,
            "n_images": int(merged["row"].numel()),
        }
        for k in metric_keys:
            mean, sem = mean_sem(merged[k][:, i])
            row[k], row[f"{k}_sem"] = mean, sem
        table.append(row)
    return table


def per_image_table(rows: Sequence[MethodSetting], merged: dict) -> list[dict]:
    """One dict per image x table row with every per-image metric ("" where it was not computed)."""
    out = []
    keys = [k for k in merged if is_metric(k)]
    for b in range(merged["row"].numel()):
        for i, s in enumerate(rows):
            row = {
                "row": int(merged["row"][b]),
                "dataset_index": int(merged["index"][b]),
                "label": int(merged["label"][b]),
                "target": int(merged["target"][b]),
                "ascent_target": int(merged["ascent_target"][b]),
                "setting": s.label,
                "method": s.method,
                "temperature": s.temperature,
            }
            for k in keys:
                v = float(merged[k][b, i])
                row[k] = "" if math.isnan(v) else v
            out.append(row)
    return out
