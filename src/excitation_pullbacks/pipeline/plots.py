"""Drawing: labelled image grids for the paper's figures (torchvision + PIL) and metric plots (matplotlib).

Every cell is min-max scaled on its own (``make_grid(normalize=True, scale_each=True)``), as in the paper.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "fig1",
    "fig2",
    "fig_ascent",
    "fig_baselines",
    "fig_sweep",
    "fig_variants",
    "labelled_grid",
    "methods_grid",
    "metric_curves",
    "randomization_curves",
    "stack_panels",
]

PAD = 2


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def labelled_grid(
    cells: Tensor, col_titles: Sequence[str], row_titles: Sequence[str] | None = None, *, min_cell: int = 96
) -> Image.Image:
    """cells (R, C, 3, H, W) -> an RGB image: R x C grid, each cell min-max scaled, titles above the columns.

    Cells smaller than ``min_cell`` pixels are upscaled (nearest) so that titles fit.
    """
    if cells.dim() != 5:
        raise ValueError(f"cells must have shape (R, C, 3, H, W), got {tuple(cells.shape)}")
    r, c, _, h, w = cells.shape
    if len(col_titles) != c:
        raise ValueError(f"{c} columns but {len(col_titles)} titles")
    flat = cells.detach().float().cpu().reshape(r * c, *cells.shape[2:])
    if max(h, w) < min_cell:
        k = -(-min_cell // max(h, w))
        flat = flat.repeat_interleave(k, -2).repeat_interleave(k, -1)
        h, w = h * k, w * k
    grid = make_grid(flat, nrow=c, padding=PAD, normalize=True, scale_each=True, pad_value=1.0)
    body = Image.fromarray(grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    font = _font(max(10, min(16, w // 8)))
    head = 22
    left = 0
    if row_titles is not None:
        left = min(120, max(int(ImageDraw.Draw(body).textlength(t, font=font)) for t in row_titles) + 8)
    out = Image.new("RGB", (body.width + left, body.height + head), "white")
    out.paste(body, (left, head))
    draw = ImageDraw.Draw(out)
    for j, title in enumerate(col_titles):
        x0 = left + PAD + j * (w + PAD)
        text = _fit(draw, str(title), font, w)
        draw.text((x0 + (w - draw.textlength(text, font=font)) / 2, 4), text, fill="black", font=font)
    for i, title in enumerate(row_titles or ()):
        y0 = head + PAD + i * (h + PAD) + h // 2 - 6
        draw.text((4, y0), _fit(draw, str(title), font, left - 6), fill="black", font=font)
    return out


def stack_panels(panels: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """Panels stacked vertically, each under a title line."""
    font = _font(16)
    band = 24
    width = max(p.width for p in panels)
    out = Image.new("RGB", (width, sum(p.height + band for p in panels)), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for panel, title in zip(panels, titles):
        draw.text((6, y + 4), str(title), fill="black", font=font)
        out.paste(panel, (0, y + band))
        y += panel.height + band
    return out


def _with_original(images: Tensor, cells: Tensor) -> Tensor:
    """images (R, 3, H, W), cells (R, K, 3, H, W) -> (R, 1 + K, 3, H, W)."""
    return torch.cat([images[:, None], cells], 1)


def fig1(
    images: Tensor, perturbed: Tensor, columns: Sequence[str], rows: Sequence[str] | None = None, *, steps: int = 5
) -> Image.Image:
    """Fig 1: differences after ``steps`` ascent steps. images (R, 3, H, W); perturbed (R, K, 3, H, W)."""
    panel = labelled_grid(_with_original(images, perturbed - images[:, None]), ["original", *columns], rows)
    return stack_panels([panel], [f"Differences after {steps} steps of ascent along excitation pullbacks"])


def fig2(
    images: Tensor,
    vanilla: Tensor,
    excitation: Tensor,
    columns: Sequence[str],
    rows: Sequence[str] | None = None,
    *,
    temperature: str = "0.3",
) -> Image.Image:
    """Fig 2: vanilla gradients (top) vs excitation pullbacks (bottom); pullbacks (R, K, 3, H, W)."""
    titles = ["original", *columns]
    return stack_panels(
        [
            labelled_grid(_with_original(images, vanilla), titles, rows),
            labelled_grid(_with_original(images, excitation), titles, rows),
        ],
        ["Vanilla gradients", f"Excitation pullbacks (T = {temperature})"],
    )


def fig_ascent(
    images: Tensor,
    perturbed: Tensor,
    columns: Sequence[str],
    rows: Sequence[str] | None = None,
    *,
    method: str = "excitation pullbacks",
    steps: int = 10,
) -> Image.Image:
    """Figs 3 / 4: perturbed images (top) and their differences from the original (bottom)."""
    titles = ["original", *columns]
    return stack_panels(
        [
            labelled_grid(_with_original(images, perturbed), titles, rows),
            labelled_grid(_with_original(images, perturbed - images[:, None]), titles, rows),
        ],
        [f"Perturbed images: {steps} steps of ascent along {method}", "Differences from the original"],
    )


def fig_sweep(
    image: Tensor, pullbacks: Tensor, temperatures: Sequence[str], columns: Sequence[str], *, title: str = ""
) -> Image.Image:
    """Temperature sweep for one image (3, H, W): pullbacks (nT, K, 3, H, W), one row per temperature."""
    cells = _with_original(image[None].expand(len(temperatures), *image.shape), pullbacks)
    panel = labelled_grid(cells, ["original", *columns], [f"T = {t}" for t in temperatures])
    return stack_panels([panel], [title or "Pullbacks by gate temperature"])


def fig_baselines(
    images: Tensor,
    baselines: Tensor,
    excitation: Tensor,
    methods: Sequence[str],
    columns: Sequence[str],
    rows: Sequence[str] | None = None,
    *,
    temperature: str = "0.3",
) -> Image.Image:
    """Fig 2's grid for each Captum baseline, then for excitation pullbacks: images (R, 3, H, W), baselines
    (R, nB, K, 3, H, W), excitation (R, K, 3, H, W)."""
    titles = ["original", *columns]
    panels = [labelled_grid(_with_original(images, baselines[:, i]), titles, rows) for i in range(len(methods))]
    panels.append(labelled_grid(_with_original(images, excitation), titles, rows))
    names = {
        "vanilla": "Vanilla gradients (Captum Saliency)",
        "smoothgrad": "SmoothGrad (Captum NoiseTunnel)",
        "guided_backprop": "Guided backprop (Captum)",
        "integrated_gradients": "Integrated gradients (Captum)",
    }
    return stack_panels(panels, [names.get(m, m) for m in methods] + [f"Excitation pullbacks (T = {temperature})"])


def fig_variants(
    images: Tensor,
    variants: Tensor,
    excitation: Tensor,
    titles: Sequence[str],
    columns: Sequence[str],
    rows: Sequence[str] | None = None,
    *,
    temperature: str = "0.3",
) -> Image.Image:
    """Fig 2's grid for each pullback variant, then for the excitation pullback itself: images (R, 3, H, W),
    variants (R, nV, K, 3, H, W) under the panel ``titles`` (nV), excitation (R, K, 3, H, W)."""
    cols = ["original", *columns]
    panels = [labelled_grid(_with_original(images, variants[:, i]), cols, rows) for i in range(len(titles))]
    panels.append(labelled_grid(_with_original(images, excitation), cols, rows))
    return stack_panels(panels, [*titles, f"Excitation pullbacks (T = {temperature})"])


def methods_grid(
    images: Tensor, maps: Tensor, methods: Sequence[str], targets: Sequence[str], *, max_rows: int = 8
) -> Image.Image:
    """Maps of every method: images (N, C, H, W), maps (N, J, C, H, W); rows are images (titled with the
    target class), columns the original and the J methods; at most ``max_rows`` rows."""
    n = min(max_rows, images.shape[0])
    rgb = (lambda t: t.expand(*t.shape[:-3], 3, *t.shape[-2:])) if images.shape[1] == 1 else (lambda t: t)
    panel = labelled_grid(_with_original(rgb(images[:n]), rgb(maps[:n])), ["original", *methods], list(targets[:n]))
    return stack_panels([panel], ["Attribution maps for the target class, by method"])


def _plot_to_image(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def metric_curves(table: Sequence[dict], metrics: Sequence[str]) -> Image.Image:
    """One panel per metric present in ``table`` (rows of the evaluate task): excitation pullbacks' mean by
    gate temperature (line, standard-error bars) and each baseline's mean as a dashed horizontal line."""
    present = [m for m in metrics if any(r.get(m, "") != "" for r in table)]
    cols = 3
    nrows = max(1, -(-len(present) // cols))
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    exc = [r for r in table if r["method"] == "excitation" and r["temperature"] != ""]
    base = [r for r in table if r["method"] != "excitation"]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, present):
        pts = [(float(r["temperature"]), r[m], r.get(f"{m}_sem") or 0.0) for r in exc if r.get(m, "") != ""]
        if pts:
            t, v, e = zip(*sorted(pts))
            ax.errorbar(t, v, yerr=e, marker="o", color="black", label="excitation", capsize=2)
            if min(t) > 0:
                ax.set_xscale("log")
            ax.set_xticks(t, [f"{x:g}" for x in t])
            ax.minorticks_off()
        for i, r in enumerate(base):
            if r.get(m, "") != "":
                ax.axhline(r[m], linestyle="--", color=colors[i % len(colors)], label=r["method"])
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("gate temperature T")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{table[0]['model']}: metrics by gate temperature (mean of {table[0]['n_images']} images)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _plot_to_image(fig)


def randomization_curves(data: dict) -> Image.Image:
    """Cascading randomization: mean Spearman and SSIM to the original maps (y) after randomising layers from
    the top (x), one line per method setting. data: {"layers": [L names], "spearman"/"ssim": {setting: [L]}}."""
    layers = data["layers"]
    fig = Figure(figsize=(max(8.0, 0.35 * len(layers) + 4), 3.6))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("spearman", "ssim")):
        for label, values in data[key].items():
            if values:
                ax.plot(range(len(values)), values, marker=".", label=label)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=6)
        ax.set_ylabel(key)
        ax.set_xlabel("randomised down to layer (cumulative, from the top)")
        ax.axhline(0, color="grey", linewidth=0.5)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Model-parameter randomization check: similarity to the original maps (lower: passes)")
    fig.tight_layout()
    return _plot_to_image(fig)
