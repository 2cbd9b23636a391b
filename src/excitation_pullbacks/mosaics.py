"""2 x 2 mosaics for the Focus localisation metric (Arias-Duart et al. 2022), as the published protocol builds
them: the target image in two random quadrants, images of other classes in the other two.

:func:`focus_mosaics` samples them from any labelled source, :func:`input_relevance` is the relevance the
protocol scores (input x attribution), :func:`~excitation_pullbacks.metrics.focus` scores it, and
:func:`focus_figure` draws mosaics, their target quadrants and each method's relevance (matplotlib, imported
when called).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics.localisation import quadrant_masks

__all__ = ["QUADRANTS", "Mosaics", "focus_figure", "focus_mosaics", "input_relevance"]

#: Quadrant order of every (M, 4) tensor here, as Quantus's Focus reads it.
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass
class Mosaics:
    """images (M, C, 2 tile, 2 tile); targets (M,) the target class; quadrants (M, 4) int64, 1 where the
    target image sits (two per mosaic); masks (M, 1, 2 tile, 2 tile) bool, the target quadrants' pixels;
    sources (M, 4) the index in the source of each quadrant's image; labels (M, 4) each quadrant's class."""

    images: Tensor
    targets: Tensor
    quadrants: Tensor
    masks: Tensor
    sources: Tensor
    labels: Tensor


def _pick(generator: torch.Generator, n: Tensor) -> Tensor:
    """One uniform index in [0, n_i) for each entry of the int64 tensor n."""
    return (torch.rand(n.shape, generator=generator, dtype=torch.float64) * n).long().clamp_max(n - 1)


def focus_mosaics(
    images: Tensor,
    labels: Tensor,
    count: int,
    *,
    tile: int = 112,
    seed: int = 0,
    distinct_distractors: bool = False,
    antialias: bool = True,
) -> Mosaics:
    """``count`` seeded 2 x 2 mosaics from images (N, C, H, W) with labels (N,).

    Per mosaic: a target class uniform over the classes present, a target image uniform over that class's
    images, two distractor classes uniform over the other classes (drawn with replacement, as published;
    ``distinct_distractors`` draws two different ones) and an image of each; the target image goes to two
    quadrants drawn without replacement, the distractors fill the other two in order. Every image is
    resized to tile x tile (bilinear, ``antialias``; the published protocol: 112 px tiles, a 224 px
    mosaic). All draws come from one ``torch.Generator`` seeded with ``seed``, so a seed gives the same
    mosaics on every machine. Needs 2 classes (3 with distinct_distractors).
    Returns :class:`Mosaics`.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images (N, C, H, W) and labels (N,) must match, got {tuple(images.shape)}, {len(labels)}")
    if count < 1 or tile < 1:
        raise ValueError(f"count and tile must be >= 1, got {count}, {tile}")
    classes, members = labels.unique(return_counts=True)
    k = classes.numel()
    if k < (3 if distinct_distractors else 2):
        raise ValueError(f"focus mosaics need at least {3 if distinct_distractors else 2} classes, got {k}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.argsort(labels, stable=True)  # images grouped by class, classes in increasing order
    start = torch.cumsum(members, 0) - members
    target = _pick(g, torch.full((count,), k))  # class positions in `classes`
    if distinct_distractors:
        r = torch.rand(count, k - 1, generator=g).argsort(1)[:, :2]
    else:
        r = _pick(g, torch.full((count, 2), k - 1))
    others = r + (r >= target[:, None]).long()  # the r-th class other than the target
    cls = torch.cat([target[:, None], others], 1)  # (M, 3): target, distractor, distractor
    picked = order[start[cls] + _pick(g, members[cls])]  # (M, 3) source indices
    at = torch.rand(count, 4, generator=g).argsort(1)[:, :2]
    quadrants = torch.zeros(count, 4, dtype=torch.long).scatter_(1, at, 1)
    slot = (1 - quadrants).cumsum(1)  # distractor number (1, 2) where not target
    which = torch.where(quadrants.bool(), torch.zeros_like(slot), slot)  # 0: target, 1/2: distractors
    sources = picked.gather(1, which)
    tiles = images.index_select(0, sources.flatten().to(images.device))
    if tiles.shape[-2:] != (tile, tile):
        tiles = F.interpolate(tiles, size=(tile, tile), mode="bilinear", align_corners=False, antialias=antialias)
    tiles = tiles.view(count, 2, 2, images.shape[1], tile, tile)  # rows (top, bottom) x columns (left, right)
    mosaics = tiles.permute(0, 3, 1, 4, 2, 5).reshape(count, images.shape[1], 2 * tile, 2 * tile)
    return Mosaics(
        images=mosaics,
        targets=classes[target],
        quadrants=quadrants,
        masks=quadrant_masks(quadrants, 2 * tile, 2 * tile).bool(),
        sources=sources,
        labels=labels[sources],
    )


def input_relevance(x: Tensor, maps: Tensor) -> Tensor:
    """The relevance the published Focus protocol scores: input x attribution, x (N, C, H, W) and maps of the
    same shape (or one channel) -> (N, C, H, W)."""
    return x * maps.to(x.dtype)


def focus_figure(
    mosaics: Mosaics,
    relevance: Mapping[str, Tensor],
    path: str | Path,
    *,
    scores: Mapping[str, Tensor] | None = None,
    class_names: Mapping[int, str] | None = None,
    rows: int = 4,
) -> Path:
    """A PNG of the first ``rows`` mosaics: the mosaic with its target quadrants outlined, then one column per
    method with its relevance (summed over channels, red positive / blue negative, symmetric scale per cell)
    and, when ``scores`` (method -> (M,)) is given, the Focus score in the title.
    relevance: method name -> (M, C, H, W) relevance of the mosaics. Returns the path written."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = min(rows, mosaics.images.shape[0])
    names = list(relevance)
    fig = Figure(figsize=(2.0 * (len(names) + 1), 2.1 * rows), dpi=110)
    axes = fig.subplots(rows, len(names) + 1, squeeze=False)
    side = mosaics.images.shape[-1]
    half = side // 2
    for i in range(rows):
        img = mosaics.images[i].detach().float().cpu()
        img = ((img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)).permute(1, 2, 0).numpy()
        ax = axes[i, 0]
        ax.imshow(img if img.shape[2] == 3 else img[..., 0], cmap=None if img.shape[2] == 3 else "gray")
        for q in range(4):
            if mosaics.quadrants[i, q]:
                r, c = divmod(q, 2)
                ax.add_patch(Rectangle((c * half, r * half), half - 1, half - 1, fill=False, ec="lime", lw=2))
        t = int(mosaics.targets[i])
        ax.set_title(f"target {class_names.get(t, t) if class_names else t}", fontsize=8)
        for j, name in enumerate(names):
            rel = relevance[name][i].detach().float().cpu().sum(0)
            lim = float(rel.abs().max()) or 1.0
            cell = axes[i, j + 1]
            cell.imshow(rel.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
            title = name if scores is None else f"{name}\nFocus {float(scores[name][i]):.2f}"
            cell.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
