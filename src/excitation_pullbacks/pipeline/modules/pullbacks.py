"""The figures task's per-batch module: pullbacks, Captum baselines and ascent of a batch of images."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor

from excitation_pullbacks import Neuron, ascent, pullback
from excitation_pullbacks.baselines import explainer

from ..neurons import neuron_views
from ..schedules import VANILLA, GateSetting
from ..signals import check_stop, stop_requested
from ..zero_maps import warn_if_zero

__all__ = ["PullbackModule"]

log = logging.getLogger(__name__)


def _checked(explain, model, x: Tensor, t: Tensor) -> Tensor:
    """``explain(model, x, t)`` after a stop check (Captum's loops take no callback)."""
    check_stop()
    return explain(model, x, t)


class PullbackModule(L.LightningModule):
    """Pullbacks, baselines and ascent of a batch of images for ``Trainer.predict``.

    model: images (N, 3, H, W) in [-1, 1] -> logits. columns: target classes (K). settings: the gate settings
    (nT). steps/step_size/eps: the ascent (steps 0: none); keep_steps: the trajectory steps kept (S).
    baselines: {Captum method: explainer options} for the same grid. variants: {name: explain function} of
    pullback variants (:mod:`excitation_pullbacks.variants`), each called as it is once per target column.
    one_target_per_pass: one forward and backward pass per target column instead of K backward passes through
    one forward (``retain_graph``), which a ``torch.compile``'d model's backward refuses once compiled with
    donated buffers. A warning line when a batch's vanilla gradients and pullbacks are all exactly 0.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        columns: Sequence[int],
        settings: Sequence[GateSetting],
        *,
        steps: int = 0,
        step_size: float = 20.0,
        eps: float = 100.0,
        keep_steps: Sequence[int] | None = None,
        baselines: dict | None = None,
        variants: dict | None = None,
        neurons: Sequence[Neuron] = (),
        neuron_setting: int = 0,
        one_target_per_pass: bool = False,
    ):
        super().__init__()
        self.one_target_per_pass = bool(one_target_per_pass)
        self.neurons, self.neuron_setting = list(neurons), int(neuron_setting)
        self.baselines = dict(baselines or {})
        self.variants = dict(variants or {})
        self._warned_zero = False
        self.model = model
        self.columns = list(columns)
        self.settings = list(settings)
        self.steps, self.step_size, self.eps = int(steps), float(step_size), float(eps)
        self.keep_steps = list(range(self.steps + 1)) if keep_steps is None else sorted(set(keep_steps))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _pullbacks(self, x: Tensor, t: Tensor, setting: GateSetting) -> Tensor:
        """x (B, 3, H, W), t (B, K) -> pullbacks (B, K, 3, H, W) at ``setting``."""
        if not self.one_target_per_pass:
            return pullback(self.model, x, t, schedule=setting.schedule, should_stop=stop_requested)
        return torch.stack(
            [
                pullback(self.model, x, t[:, k], schedule=setting.schedule, should_stop=stop_requested)
                for k in range(t.shape[1])
            ],
            1,
        )

    def _ascent(self, x: Tensor, t: Tensor, setting: GateSetting) -> tuple[Tensor, Tensor]:
        """-> kept trajectory steps (B, S, K, 3, H, W) and the final images' logits (B, K, classes)."""
        final, traj = ascent(
            self.model,
            x,
            t,
            steps=self.steps,
            step_size=self.step_size,
            eps=self.eps,
            schedule=setting.schedule,
            return_trajectory=True,
            should_stop=stop_requested,
        )
        with torch.no_grad():
            logits = self.model(final.flatten(0, 1)).view(*final.shape[:2], -1)
        return traj[self.keep_steps].transpose(0, 1), logits

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """batch: (images (B, 3, H, W), labels (B,), dataset indices (B,), rows (B,)) -> dict of CPU tensors:
        vanilla (B, K, 3, H, W), excitation (B, nT, K, 3, H, W), baselines (B, nB, K, 3, H, W) and variants
        (B, nV, K, 3, H, W) when asked,
        logit_before (B, K), top1_before (B,) and with ascent exc_ascent (B, nT, S, K, 3, H, W),
        van_ascent (B, S, K, 3, H, W), exc_logit_after / exc_top1_after (B, nT, K), van_logit_after /
        van_top1_after (B, K).
        """
        with torch.enable_grad():  # Lightning predicts under no_grad / inference_mode
            return self._predict(batch)

    def _predict(self, batch) -> dict[str, Tensor]:
        x, labels, index, rows = batch
        t = torch.tensor(self.columns, device=x.device).expand(x.shape[0], -1)
        out: dict[str, Tensor] = {"images": x, "label": labels, "index": index, "row": rows}
        log.info(
            "rank %d: pullbacks of %d images x %d targets at %d gate settings",
            self.global_rank,
            x.shape[0],
            t.shape[1],
            len(self.settings),
        )
        out["vanilla"] = self._pullbacks(x, t, VANILLA)
        out["excitation"] = torch.stack([self._pullbacks(x, t, s) for s in self.settings], 1)
        if not self._warned_zero and not out["vanilla"].any():  # once per run: its other batches are alike
            self._warned_zero = warn_if_zero(out["excitation"], self.model, log)
        if self.baselines:
            maps = []
            for method, options in self.baselines.items():
                log.info("rank %d: %s maps (Captum)", self.global_rank, method)
                explain = explainer(method, **options)
                maps.append(torch.stack([_checked(explain, self.model, x, t[:, k]) for k in range(t.shape[1])], 1))
            out["baselines"] = torch.stack(maps, 1)  # (B, nB, K, 3, H, W)
        if self.variants:
            maps = []
            for name, explain in self.variants.items():
                log.info("rank %d: %s maps", self.global_rank, name)
                maps.append(torch.stack([_checked(explain, self.model, x, t[:, k]) for k in range(t.shape[1])], 1))
            out["variants"] = torch.stack(maps, 1)  # (B, nV, K, 3, H, W)
        with torch.no_grad():
            logits = self.model(x)
        out["logit_before"] = logits.gather(1, t)
        out["top1_before"] = logits.argmax(1)
        if self.neurons:
            log.info("rank %d: pullbacks and ascent of %d hidden neurons", self.global_rank, len(self.neurons))
            budget = dict(steps=self.steps, step_size=self.step_size, eps=self.eps)
            out.update(neuron_views(self.model, x, self.neurons, self.settings[self.neuron_setting], **budget))
        if self.steps > 0:
            runs = []
            for s in self.settings:
                log.info(
                    "rank %d: %d ascent steps along excitation pullbacks (T = %s)",
                    self.global_rank,
                    self.steps,
                    s.label,
                )
                runs.append(self._ascent(x, t, s))
            out["exc_ascent"] = torch.stack([r[0] for r in runs], 1)
            after = torch.stack([r[1] for r in runs], 1)  # (B, nT, K, classes)
            out["exc_logit_after"] = after.gather(3, t[:, None, :, None].expand(-1, len(runs), -1, 1))[..., 0]
            out["exc_top1_after"] = after.argmax(3)
            log.info("rank %d: %d ascent steps along vanilla gradients", self.global_rank, self.steps)
            out["van_ascent"], van = self._ascent(x, t, VANILLA)
            out["van_logit_after"] = van.gather(2, t[..., None])[..., 0]
            out["van_top1_after"] = van.argmax(2)
        return {k: v.detach().cpu() for k, v in out.items()}
