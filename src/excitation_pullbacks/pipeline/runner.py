"""Lightning predict runner: pullbacks, temperature sweep and ascent per image, and the prediction writer.

Each predict step takes a batch of selected images (B, 3, H, W) in [-1, 1] and, for every target column
and every gate setting, computes the vanilla gradient, the excitation pullbacks and (optionally) ascent
trajectories. :class:`ResultWriter` writes one shard per rank; after a barrier rank 0 merges them, draws the
figures, writes tensors, metrics and the config, logs to W&B/CSV, and renames the staging folder to its final
name, so that a failed run leaves no half-written results.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from excitation_pullbacks import ascent, pullback

__all__ = ["Setting", "PullbackModule", "ResultWriter", "merge_shards"]

log = logging.getLogger(__name__)


@dataclass
class Setting:
    """One gate setting: a label for tables and figures, and the pullback/ascent keyword arguments."""

    label: str
    kwargs: dict = field(default_factory=dict)


class PullbackModule(L.LightningModule):
    """Wraps a classifier (images in [-1, 1] -> logits (N, classes)) for ``Trainer.predict``.

    columns: K target classes (the same for every image). settings: nT gate settings.
    steps, step_size, eps: projected gradient ascent (steps=0: none). keep_steps: the trajectory steps kept
    (None: all steps + 1). baselines: {method: options} of :func:`excitation_pullbacks.baselines.explainer`,
    computed for every image x target as well.
    """

    def __init__(self, model: torch.nn.Module, columns: Sequence[int], settings: Sequence[Setting], *,
                 steps: int = 0, step_size: float = 20.0, eps: float = 100.0, keep_steps: Sequence[int] | None = None,
                 baselines: dict | None = None):
        super().__init__()
        self.baselines = dict(baselines or {})  # {method: explainer options}: Captum maps for the same grid
        self.model = model
        self.columns = list(columns)
        self.settings = list(settings)
        self.steps, self.step_size, self.eps = int(steps), float(step_size), float(eps)
        self.keep_steps = list(range(self.steps + 1)) if keep_steps is None else sorted(set(keep_steps))
        self.model_seconds = 0.0  # wall time of predict steps in this process (model passes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _ascent(self, x: Tensor, t: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """-> kept trajectory steps (B, S, K, 3, H, W) and the final images' logits (B, K, classes)."""
        final, traj = ascent(self.model, x, t, steps=self.steps, step_size=self.step_size, eps=self.eps,
                             return_trajectory=True, **kwargs)
        with torch.no_grad():
            logits = self.model(final.flatten(0, 1)).view(*final.shape[:2], -1)
        return traj[self.keep_steps].transpose(0, 1), logits

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """batch: (images (B, 3, H, W), labels (B,), dataset indices (B,), rows (B,)) -> dict of CPU tensors:
        vanilla (B, K, 3, H, W), excitation (B, nT, K, 3, H, W), baselines (B, nB, K, 3, H, W) when asked,
        logit_before (B, K), top1_before (B,) and with
        ascent exc_ascent (B, nT, S, K, 3, H, W), van_ascent (B, S, K, 3, H, W), exc_logit_after /
        exc_top1_after (B, nT, K), van_logit_after / van_top1_after (B, K).
        """
        start = time.perf_counter()
        try:
            return self._predict(batch)
        finally:
            if batch[0].is_cuda:  # count the queued kernels in this step's time
                torch.cuda.synchronize()
            self.model_seconds += time.perf_counter() - start

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        t = torch.tensor(self.columns, device=x.device).expand(x.shape[0], -1)
        out: dict[str, Tensor] = {"images": x, "label": labels, "index": index, "row": rows}
        log.info("rank %d: pullbacks of %d images x %d targets at %d gate settings", self.global_rank, x.shape[0],
                 t.shape[1], len(self.settings))
        with torch.enable_grad():  # Lightning predicts under no_grad / inference_mode
            out["vanilla"] = pullback(self.model, x, t, temperature=0.0, gate="hard")
            out["excitation"] = torch.stack([pullback(self.model, x, t, **s.kwargs) for s in self.settings], 1)
            if self.baselines:
                from excitation_pullbacks.baselines import explainer

                maps = []
                for method, options in self.baselines.items():
                    log.info("rank %d: %s maps (Captum)", self.global_rank, method)
                    explain = explainer(method, **options)
                    maps.append(torch.stack([explain(self.model, x, t[:, k]) for k in range(t.shape[1])], 1))
                out["baselines"] = torch.stack(maps, 1)  # (B, nB, K, 3, H, W)
            with torch.no_grad():
                logits = self.model(x)
            out["logit_before"] = logits.gather(1, t)
            out["top1_before"] = logits.argmax(1)
            if self.steps > 0:
                runs = []
                for s in self.settings:
                    log.info("rank %d: %d ascent steps along excitation pullbacks (T = %s)", self.global_rank,
                             self.steps, s.label)
                    runs.append(self._ascent(x, t, **s.kwargs))
                out["exc_ascent"] = torch.stack([r[0] for r in runs], 1)
                after = torch.stack([r[1] for r in runs], 1)  # (B, nT, K, classes)
                out["exc_logit_after"] = after.gather(3, t[:, None, :, None].expand(-1, len(runs), -1, 1))[..., 0]
                out["exc_top1_after"] = after.argmax(3)
                log.info("rank %d: %d ascent steps along vanilla gradients", self.global_rank, self.steps)
                out["van_ascent"], van = self._ascent(x, t, vanilla=True)
                out["van_logit_after"] = van.gather(2, t[..., None])[..., 0]
                out["van_top1_after"] = van.argmax(2)
        return {k: v.detach().cpu() for k, v in out.items()}


def merge_shards(shards: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-rank prediction dicts along the image axis and sort by row."""
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = merged["row"].argsort()
    return {k: v[order] for k, v in merged.items()}


class ResultWriter(BasePredictionWriter):
    """Writes ``staging/shards/rank<r>.pt`` on every rank; rank 0 merges after a barrier and calls
    ``finalize(merged)``. ``finalize`` must be picklable (ddp_spawn)."""

    def __init__(self, staging: str | os.PathLike, finalize: Callable[[dict[str, Tensor]], None]):
        super().__init__(write_interval="epoch")
        self.staging = Path(staging)
        self.finalize = finalize

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        shard_dir = self.staging / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        shard = {k: torch.cat([p[k] for p in preds]) for k in preds[0]} if preds else {}
        torch.save(shard, shard_dir / f"rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("shards written")
        error = None
        if trainer.is_global_zero:
            try:
                shards = [torch.load(shard_dir / f"rank{r}.pt", weights_only=True) for r in range(trainer.world_size)]
                shutil.rmtree(shard_dir)
                self.finalize(merge_shards([s for s in shards if s]))
            except Exception as err:  # noqa: BLE001 - re-raised after the barrier so other ranks do not hang
                error = err
        trainer.strategy.barrier("results written")
        if error is not None:
            raise error


def write_metrics_csv(path: Path, merged: dict[str, Tensor], columns: Sequence[int], labels: Sequence[str],
                      names: Sequence[str]) -> list[list]:
    """metrics.csv: one row per image x target x method (excitation at each T, vanilla). Returns the rows."""
    header = ["row", "dataset_index", "label", "label_name", "target", "target_name", "method", "temperature",
              "logit_before", "top1_before", "top1_before_name", "logit_after", "top1_after", "top1_after_name",
              "hit_after"]
    rows = []
    has_ascent = "exc_ascent" in merged
    for i in range(merged["images"].shape[0]):
        base = [int(merged["row"][i]), int(merged["index"][i]), int(merged["label"][i]), names[int(merged["label"][i])]]
        top_b = int(merged["top1_before"][i])
        for k, c in enumerate(columns):
            before = [float(merged["logit_before"][i, k]), top_b, names[top_b]]
            methods = [("excitation", lab, j) for j, lab in enumerate(labels)] + [("vanilla", "0", None)]
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
    path.write_text(buf.getvalue())
    return [header, *rows]
