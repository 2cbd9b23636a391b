"""The ``published_table`` task: the published comparison protocol of attribution methods on one model.

Rows: the methods (``published.methods``, any name of :data:`excitation_pullbacks.baselines.REGISTRY`, with
the options of ``baselines=`` and the gate of ``gate=`` at ``gate.temperature``); columns: the six metrics of
:data:`excitation_pullbacks.metrics.METRIC_NAMES` with the published settings
(:data:`~excitation_pullbacks.metrics.PUBLISHED`, scaled to the image size; ``published.settings`` replaces
some: {metric: {keyword: value}}) on the first
``published.num_images`` images of a seeded shuffle of the data, and Focus on ``published.mosaics`` seeded
2 x 2 mosaics (``published.tile`` px tiles, null: half the image size) of the first ``published.mosaic_pool``
images, relevance = input x attribution. Each batch seeds torch with ``seed`` + its first row, so the
random methods and the metrics' draws repeat for the same batches.

Rank 0 writes::

    results/  published_table.csv (method, then mean, std, n per metric), published_table.md (mean ± std),
              per_image.csv, paired.csv (each method minus the first, per metric: mean and bootstrap
              interval, ``published.bootstrap``); the skeleton saves focus.png (mosaics, target quadrants,
              relevance per method) and logs the table and the paired differences (``paired``) to W&B
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch import Tensor, nn

from excitation_pullbacks import build_model
from excitation_pullbacks import metrics as M
from excitation_pullbacks.baselines import REGISTRY, BaselineOptions, explainer
from excitation_pullbacks.mosaics import Mosaics, focus_figure, focus_mosaics, input_relevance

from ..classes import class_names, class_space, resolve_classes
from ..data import build_dataset
from ..errors import PipelineError
from ..outputs import write_csv
from ..picklable import Rebuilt
from ..schedules import check_main_temperature, check_temperatures, main_setting, run_gate_settings
from ..signals import check_stop, stop_requested
from ..tables.paired import as_table, bootstrap_options, difference
from .base import Outputs, Plan, RunContext, Task

__all__ = ["PublishedTableModule", "PublishedTableTask", "markdown_table", "summary_rows"]

log = logging.getLogger(__name__)

#: Column names and which way is better.
COLUMNS = {
    "infidelity": "lower",
    "faithfulness_correlation": "higher",
    "faithfulness_estimate": "higher",
    "monotonicity_correlation": "higher",
    "max_sensitivity": "lower",
    "random_logit": "lower",
    "focus": "higher",
}


class PublishedTableModule(L.LightningModule):
    """Per batch: every method's maps, the six metrics per image, and Focus on the mosaics whose number is a
    row of the batch (mosaic r goes with image row r).

    model: images -> logits; explainers: {method: explain}; protocol: the metric settings, overrides:
    {metric: {keyword: value}} replacing some of them; mosaics: the Focus mosaics (M <= the number of images);
    figure_rows: mosaics whose relevance is returned for the figure.
    """

    def __init__(
        self,
        model: nn.Module,
        explainers: dict,
        protocol: M.MetricProtocol,
        mosaics: Mosaics,
        *,
        seed: int,
        figure_rows: int,
        batch_size: int,
        overrides: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.explainers = explainers
        self.protocol = protocol
        self.mosaics = mosaics
        self.seed = seed
        self.figure_rows = figure_rows
        self.metric_batch = batch_size
        self.overrides = overrides or {}
        self.model_seconds = 0.0

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """batch: (x (B, C, H, W), labels (B,), index (B,), rows (B,)) -> CPU tensors: scores (B, methods, 6);
        focus (B, methods), NaN for rows without a mosaic; relevance (B, methods, C, 2T, 2T) for the figure's
        rows (zeros elsewhere)."""
        start = time.perf_counter()
        device = batch[0].device
        try:
            with (
                torch.enable_grad(),
                torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
            ):
                torch.manual_seed(self.seed + int(batch[3][0]))
                return self._predict(batch)
        finally:
            self.model_seconds += time.perf_counter() - start

    def _metric(self, name: str, explain, x: Tensor, t: Tensor, maps: Tensor, generator) -> Tensor:
        options = self.protocol.settings(name) | dict(self.overrides.get(name, {}))
        if name in ("max_sensitivity", "random_logit"):
            if name == "max_sensitivity":
                options.update(generator=generator, should_stop=stop_requested, batch_size=self.metric_batch)
            return getattr(M, name)(self.model, x, t, explain, maps, **options)
        options.update(batch_size=self.metric_batch, should_stop=stop_requested)
        if "uniform" in options.values():
            options["generator"] = generator
        return getattr(M, name)(self.model, x, t, maps, **options)

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        t = labels.to(x.device)
        mosaic = rows < self.mosaics.images.shape[0]
        m_rows = rows[mosaic].cpu()
        mx = self.mosaics.images[m_rows].to(device=x.device, dtype=x.dtype)
        mt = self.mosaics.targets[m_rows].to(x.device)
        scores = torch.full((len(x), len(self.explainers), len(M.METRIC_NAMES)), math.nan, dtype=torch.float64)
        focus = torch.full((len(x), len(self.explainers)), math.nan, dtype=torch.float64)
        side = self.mosaics.images.shape[-1]
        relevance = torch.zeros(len(x), len(self.explainers), x.shape[1], side, side)
        show = (rows < self.figure_rows) & mosaic
        for i, (method, explain) in enumerate(self.explainers.items()):
            check_stop()
            log.info("rank %d: %s on %d images", self.global_rank, method, len(x))
            maps = explain(self.model, x, t)
            g = torch.Generator().manual_seed(self.seed + int(rows[0]) + 7919 * i)
            for j, name in enumerate(M.METRIC_NAMES):
                scores[:, i, j] = self._metric(name, explain, x, t, maps, g).double().cpu()
            if len(mx):
                rel = input_relevance(mx, explain(self.model, mx, mt))
                focus[mosaic, i] = M.focus(rel, self.mosaics.quadrants[m_rows].to(x.device)).double().cpu()
                relevance[show, i] = rel[show[mosaic]].float().cpu()
        return {"row": rows.cpu(), "index": index.cpu(), "label": labels.cpu(), "scores": scores, "focus": focus,
                "relevance": relevance}  # fmt: skip


def summary_rows(methods: list[str], scores: Tensor, focus: Tensor) -> list[dict]:
    """One row per method: mean, std (ddof 1) and n of the finite per-image values of each column.
    scores (N, methods, 6), focus (N, methods)."""
    out = []
    for i, method in enumerate(methods):
        row: dict = {"method": method}
        columns = [scores[:, i, j] for j in range(len(M.METRIC_NAMES))] + [focus[:, i]]
        for name, v in zip(COLUMNS, columns):
            v = v[torch.isfinite(v)]
            row[f"{name}_mean"] = float(v.mean()) if len(v) else ""
            row[f"{name}_std"] = float(v.std()) if len(v) > 1 else ""
            row[f"{name}_n"] = len(v)
        out.append(row)
    return out


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a Markdown table: methods x metrics, cells ``mean ± std``, n in the header."""

    def cell(r: dict, name: str) -> str:
        mean, std = r[f"{name}_mean"], r[f"{name}_std"]
        if mean == "":
            return ""
        return f"{mean:.3g} ± {std:.2g}" if std != "" else f"{mean:.3g}"

    header = ["method"] + [f"{name} ({way} better, n={rows[0][f'{name}_n']})" for name, way in COLUMNS.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([r["method"]] + [cell(r, name) for name in COLUMNS]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class PublishedTableTask(Task):
    """``task: published_table``: the published protocol's table of attribution methods x metrics."""

    name = "published_table"

    def validate(self, cfg) -> None:
        p = cfg.published
        unknown = [m for m in p.methods if m not in REGISTRY]
        if unknown or not p.methods:
            raise PipelineError(
                f"published.methods must name some of {', '.join(REGISTRY)}; got {list(map(str, p.methods))}"
            )
        if int(p.num_images) < 1 or not 0 <= int(p.mosaics) <= int(p.num_images):
            raise PipelineError("published.num_images must be >= 1 and 0 <= published.mosaics <= num_images")
        bad = [k for k in (p.get("settings") or {}) if k not in M.METRIC_NAMES]
        if bad:
            raise PipelineError(
                f"published.settings names unknown metrics {bad}; choose from {', '.join(M.METRIC_NAMES)}"
            )
        try:
            bootstrap_options(p.get("bootstrap"))
        except ValueError as err:
            raise PipelineError(str(err)) from None
        if "excitation" in p.methods:
            check_main_temperature(cfg.gate, check_temperatures(cfg.temperatures))

    def plan(self, ctx: RunContext) -> Plan:
        cfg, p = ctx.cfg, ctx.cfg.published
        space = class_space(cfg)
        self.class_names = class_names(space)
        model = build_model(cfg.model.name, cfg.model.weights, checkpoint=cfg.model.checkpoint)
        dataset = build_dataset(cfg.data, resolve_classes(list(cfg.targets.rows), space), space)
        if len(dataset) == 0:
            raise PipelineError("the dataset is empty")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(cfg.seed)))
        pool = order[: max(int(p.num_images), int(p.mosaic_pool))]
        items = [dataset[int(i)] for i in pool]
        images = torch.stack([im for im, _ in items])
        labels = torch.tensor([int(y) for _, y in items])
        n = min(int(p.num_images), len(items))
        size = images.shape[-1]
        tile = int(p.tile) if p.get("tile") is not None else size // 2
        if int(p.mosaics) > 0:
            mosaics = focus_mosaics(images, labels, int(p.mosaics), tile=tile, seed=int(cfg.seed))
        else:
            none = torch.zeros(0, 4, dtype=torch.long)
            empty = images[:0, :, :1, :1].expand(0, -1, 2 * tile, 2 * tile)
            mosaics = Mosaics(
                empty, labels[:0], none, torch.zeros(0, 1, 2 * tile, 2 * tile, dtype=torch.bool), none, none
            )
        gates = run_gate_settings(cfg, model, dataset, images[:1])
        schedule = gates[main_setting(gates, cfg.gate)].schedule
        options = {f.name: cfg.baselines[f.name] for f in fields(BaselineOptions) if f.name in cfg.baselines}
        self.methods = [str(m) for m in p.methods]
        self.bootstrap = bootstrap_options(p.get("bootstrap"))
        explainers = {m: Rebuilt(explainer, m, schedule, **options) for m in self.methods}
        protocol = M.PUBLISHED if size == M.PUBLISHED.size else M.PUBLISHED.scaled(size)
        self.protocol_size = protocol.size
        self.mosaics = mosaics
        self.figure_rows = min(int(p.figure_rows), int(p.mosaics))
        module = PublishedTableModule(
            model,
            explainers,
            protocol,
            mosaics,
            seed=int(cfg.seed),
            figure_rows=self.figure_rows,
            batch_size=int(p.metric_batch_size),
            overrides={k: dict(v) for k, v in (p.get("settings") or {}).items()},
        )
        return Plan(module, images[:n], labels[:n], pool[:n])

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        scores, focus = merged["scores"], merged["focus"]
        rows = summary_rows(self.methods, scores, focus)
        write_csv(staging / "published_table.csv", rows)
        (staging / "published_table.md").write_text(markdown_table(rows))
        per_image = []
        for b in range(len(merged["row"])):
            for i, method in enumerate(self.methods):
                r = {"row": int(merged["row"][b]), "dataset_index": int(merged["index"][b]), "method": method}
                for j, name in enumerate(M.METRIC_NAMES):
                    r[name] = float(scores[b, i, j])
                r["focus"] = "" if math.isnan(float(focus[b, i])) else float(focus[b, i])
                per_image.append(r)
        write_csv(staging / "per_image.csv", per_image)
        paired = []
        for i, method in enumerate(self.methods[1:], start=1):
            columns = [(name, scores[:, :, j]) for j, name in enumerate(M.METRIC_NAMES)] + [("focus", focus)]
            for name, values in columns:
                d = difference(values[:, i], values[:, 0], self.bootstrap)
                paired.append({"method": method, "reference": self.methods[0], "metric": name, **d})
        if paired:
            write_csv(staging / "paired.csv", paired)
        figures = {}
        if self.figure_rows:
            rel = {m: merged["relevance"][: self.figure_rows, i] for i, m in enumerate(self.methods)}
            shown = Mosaics(*(getattr(self.mosaics, f.name)[: self.figure_rows] for f in fields(Mosaics)))
            score = {m: focus[: self.figure_rows, i] for i, m in enumerate(self.methods)}
            names = dict(enumerate(self.class_names))
            with tempfile.TemporaryDirectory() as tmp:
                path = focus_figure(
                    shown, rel, Path(tmp) / "focus.png", scores=score, class_names=names, rows=self.figure_rows
                )
                image = Image.open(path).convert("RGB")
            figures["focus"] = (image, "Focus mosaics: target quadrants and input x attribution per method")
        table = [["method"] + [f"{c}_{s}" for c in COLUMNS for s in ("mean", "std", "n")]]
        table += [[r["method"]] + [r[f"{c}_{s}"] for c in COLUMNS for s in ("mean", "std", "n")] for r in rows]
        summary = {f"{r['method']}/{c}": r[f"{c}_mean"] for r in rows for c in COLUMNS if r[f"{c}_mean"] != ""}
        return Outputs(figures=figures, table=table, summary=summary, tables={"paired": as_table(paired)})
