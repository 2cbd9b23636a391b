"""Paired-difference rows: per-image differences of two score columns on the same images, with their bootstrap
interval (:func:`excitation_pullbacks.metrics.paired_difference`), as CSV rows and as a table to log."""

from __future__ import annotations

from excitation_pullbacks import metrics as M

__all__ = ["BOOTSTRAP", "FIELDS", "as_table", "bootstrap_options", "difference"]

#: The bootstrap settings and their defaults (``published.bootstrap``).
BOOTSTRAP = {"resamples": 10000, "confidence": 0.95, "seed": 0}
#: The columns :func:`difference` adds to a row.
FIELDS = ("mean", "low", "high", "std", "n", "confidence", "resamples")


def bootstrap_options(settings) -> dict:
    """``published.bootstrap`` (a mapping, None for the defaults) -> paired_difference's keywords; raises
    ValueError for unknown keys or values paired_difference refuses."""
    got = dict(settings or {})
    unknown = sorted(set(got) - set(BOOTSTRAP))
    if unknown:
        raise ValueError(f"published.bootstrap has unknown keys {unknown}; choose from {', '.join(BOOTSTRAP)}")
    options = BOOTSTRAP | {k: (float(v) if k == "confidence" else int(v)) for k, v in got.items()}
    M.paired_difference([0.0], [0.0], **options)  # its checks of resamples and confidence
    return options


def difference(a, b, options: dict) -> dict:
    """a, b: (N,) scores on the same N images -> {mean, low, high, std, n, confidence, resamples} of a - b."""
    d = M.paired_difference(a, b, **options)
    return {name: getattr(d, name) for name in FIELDS}


def as_table(rows: list[dict]) -> list[list]:
    """Rows (dicts with the same keys) -> header row, then value rows (what the W&B table takes)."""
    if not rows:
        return []
    header = list(rows[0])
    return [header] + [[r.get(k, "") for k in header] for r in rows]
