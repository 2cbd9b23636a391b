"""Charts of the training and path-stability tasks (matplotlib's object API, no pyplot state): a heatmap of
a matrix with its numbers, curves over checkpoints, and the conversion of a Figure to a PIL image."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["curves", "figure_image", "heatmap"]


def figure_image(fig: Figure, dpi: int = 110) -> Image.Image:
    """The figure rendered to an RGB PIL image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def heatmap(
    matrices: Sequence[np.ndarray],
    titles: Sequence[str],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    xlabel: str,
    ylabel: str,
    vmin: float = -1.0,
    vmax: float = 1.0,
) -> Figure:
    """One panel per matrix (R, C), a shared colour scale [vmin, vmax], each cell labelled with its value."""
    n = len(matrices)
    fig = Figure(figsize=(0.42 * len(cols) * n + 1.6 * n + 1, 0.36 * len(rows) + 1.6))
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    image = None
    for ax, m, title in zip(axes, matrices, titles):
        image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                light = (v - vmin) / (vmax - vmin) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5, color="w" if light else "k")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8)
    return fig


def curves(
    panels: Sequence[tuple[str, str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
    *,
    xlabel: str,
    xscale: str = "symlog",
) -> Figure:
    """One panel per (title, ylabel, {label: (x, y)}), lines with markers."""
    fig = Figure(figsize=(4.3 * len(panels), 3.3))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (title, ylabel, lines) in zip(axes, panels):
        for label, (x, y) in lines.items():
            ax.plot(x, y, "o-", ms=3, lw=1, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale=xscale)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
