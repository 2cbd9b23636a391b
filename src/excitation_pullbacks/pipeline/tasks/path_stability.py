"""The ``path_stability`` task: measurements for Hypothesis 1 (paper Sec. 5.1) over a train run's checkpoints.

For the checkpoints t of one train run (``stability.runs`` with ``{seed}`` = the run's seed; the architecture
and classes from its ``checkpoints/model.json``, which ``model.name`` must name) and inputs X (``data=digits``:
the first ``stability.num_images`` of ``data.split``; ``data=folder``: of the run's class folder in a fixed
seeded order, at the run's image size):

- rho(t_pi, t) = Pearson(f^(t)(X), f_pi^(t)(X)), f_pi^(t) the checkpoint-t network run with the binary gates
  pi = G^(t_pi)(x) of checkpoint t_pi on the same x (ReLU gates and max-pool argmax positions), per class
  logit and pooled over the classes; the row t_pi = 0 is pi from the random initialisation;
- the same with pi from another seed's run (the first of ``stability.control_seeds`` that differs from the
  seed), at the same steps: the control;
- the accuracy of f_pi^(t) on the labels;
- per call site, the overlap of the binary gates of every pair of checkpoints (agreement, IoU), and between
  the two seeds at the same step;
- for the final model at each gate temperature T: rho(Gamma~_T(x), pi(x)) of the rank-1 path tensors per
  input (pi from each checkpoint of the run, and of the control run), per-site Pearson of the gate values,
  and Pearson(f(X), f_Gamma_T(X)).

Rank 0 writes::

    results/  rho.csv (kind, t_pi, t, class, rho), accuracy.csv, gate_overlap.csv, soft_vs_binary.csv,
              stability.json (the matrices), rho_heatmap.png, stability_curves.png
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from excitation_pullbacks.gate_overlap import pearson
from excitation_pullbacks.gating_induced import record_gates
from excitation_pullbacks.models import build_model
from excitation_pullbacks.models.digits import digits_images

from ..atomic import write_text
from ..charts import curves, figure_image, heatmap
from ..checkpoints import model_info, read_checkpoints
from ..errors import PipelineError
from ..image_folder import class_folder
from ..modules import PathStabilityModule
from ..schedules import check_temperatures, gate_settings
from ..signals import check_stop
from .base import Outputs, Plan, RunContext, Task

__all__ = ["PathStabilityTask", "correlations"]


def correlations(logits: Tensor, reference: Tensor) -> tuple[float, list[float]]:
    """Pearson's r between two logit sets (N, C): pooled over all N * C values, and per class (C,)."""
    a, b = logits.double(), reference.double()
    pooled = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    per = [float(torch.corrcoef(torch.stack([a[:, c], b[:, c]]))[0, 1]) for c in range(a.shape[1])]
    return pooled, per


def _finite(v):
    """v with every NaN / inf float (nested in lists and dicts) replaced by None, for strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


class PathStabilityTask(Task):
    """``task: path_stability``: rho(t_pi, t), gate overlaps and rho(Gamma_T, pi) for one train run."""

    name = "path_stability"

    def validate(self, cfg) -> None:
        s = cfg.get("stability")
        if s is None:
            raise PipelineError("task=path_stability needs a stability config (experiment=path_stability)")
        if cfg.data.kind not in ("digits", "folder"):
            raise PipelineError(f"path_stability runs on data=digits or data=folder, not data={cfg.data.kind}")
        check_temperatures(cfg.temperatures)

    def _runs(self, cfg) -> tuple[Path, Path | None, int | None]:
        s, seed = cfg.stability, int(cfg.seed)
        own = Path(str(s.runs).format(seed=seed))
        others = [int(c) for c in (s.control_seeds or []) if int(c) != seed]
        if not others:
            return own, None, None
        return own, Path(str(s.runs).format(seed=others[0])), others[0]

    @staticmethod
    def _load(info: dict, path: Path) -> nn.Module:
        """A checkpoint of the run ``info`` (:func:`.train.model_info`) describes, in eval mode."""
        try:
            return build_model(info["name"], None, checkpoint=path, num_classes=int(info["num_classes"]))
        except (FileNotFoundError, ValueError) as err:
            raise PipelineError(str(err)) from None

    @staticmethod
    def _inputs(cfg, info: dict, num_images) -> tuple[Tensor, Tensor]:
        """X: images (N, 3, S, S) in [-1, 1] and labels (N,) in the run's class order."""
        if cfg.data.kind == "digits":
            x, y = digits_images(str(cfg.data.get("split", "train")), int(cfg.data.get("size", 32)))
            n = len(y) if num_images is None else min(int(num_images), len(y))
            return x[:n], y[:n]
        if int(cfg.data.crop) != int(info["size"]):
            raise PipelineError(
                f"the run trained on {info['size']} px images: set data.crop={info['size']} (and data.resize as in "
                f"the run)"
            )
        folder = class_folder(cfg.data, classes=info["classes"])
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))  # classes mixed
        n = len(folder) if num_images is None else min(int(num_images), len(folder))
        items = []
        for i in order[:n].tolist():
            check_stop()
            items.append(folder[i])
        return torch.stack([im for im, _ in items]), torch.tensor([c for _, c in items])

    def plan(self, ctx: RunContext) -> Plan:
        cfg, s = ctx.cfg, ctx.cfg.stability
        own_dir, control_dir, control_seed = self._runs(cfg)
        rows = read_checkpoints(own_dir)
        if s.get("steps"):
            wanted = {int(t) for t in s.steps}
            rows = [r for r in rows if r["step"] in wanted]
        control_rows = read_checkpoints(control_dir) if control_dir is not None else []
        if control_rows:
            steps = {r["step"] for r in rows}
            control_rows = [r for r in control_rows if r["step"] in steps]
        info = model_info(own_dir)
        if str(cfg.model.name) != info["name"]:
            raise PipelineError(
                f"the checkpoints in {own_dir} are {info['name']}'s: run with model.name={info['name']}"
            )
        if control_dir is not None and (other := model_info(control_dir)) != info:
            raise PipelineError(
                f"the control run {control_dir} trained {other['name']} on classes {other['classes']}, the run "
                f"{own_dir} {info['name']} on {info['classes']}: both runs must train the same model on the same data"
            )
        models = [self._load(info, r["path"]) for r in rows]
        controls = [self._load(info, r["path"]) for r in control_rows]
        x, y = self._inputs(cfg, info, s.get("num_images"))
        n = len(y)
        temps = check_temperatures(cfg.temperatures)
        settings = gate_settings(cfg.gate, temps, model=models[-1], example=x[:1])
        self.meta = {
            "run": str(own_dir),
            "control_run": None if control_dir is None else str(control_dir),
            "control_seed": control_seed,
            "steps": [r["step"] for r in rows],
            "control_steps": [r["step"] for r in control_rows],
            "test_acc": [r["test_acc"] for r in rows],
            "temperatures": [st.label for st in settings],
            "sites": list(record_gates(models[0], x[:1]).keys),
            "num_images": n,
        }
        return Plan(PathStabilityModule(models, controls, settings), x, y, torch.arange(n))

    def finalize(self, merged: dict[str, Tensor], staging: Path) -> Outputs:
        m = self.meta
        steps, csteps, sites, temps = m["steps"], m["control_steps"], m["sites"], m["temperatures"]
        k, own, labels = len(steps), merged["own"], merged["label"]
        f = torch.stack([own[:, t, t] for t in range(k)], 1)  # (N, K, C): every checkpoint with its own gates
        rho = np.full((k, k), np.nan)
        rho_cls = np.full((k, k), np.nan)
        acc = np.zeros((k, k))
        rho_rows = []
        for p in range(k):
            for t in range(k):
                pooled, per = correlations(own[:, p, t], f[:, t])
                rho[p, t], rho_cls[p, t] = pooled, float(np.nanmean(per))
                acc[p, t] = float((own[:, p, t].argmax(1) == labels).double().mean())
                rho_rows += [["own", steps[p], steps[t], "all", pooled]]
                rho_rows += [["own", steps[p], steps[t], c, r] for c, r in enumerate(per)]
        kc = len(csteps)
        rho_ctrl = np.full((kc, k), np.nan)
        acc_ctrl = np.zeros((kc, k))
        if kc:
            for p in range(kc):
                for t in range(k):
                    pooled, per = correlations(merged["control"][:, p, t], f[:, t])
                    rho_ctrl[p, t] = pooled
                    acc_ctrl[p, t] = float((merged["control"][:, p, t].argmax(1) == labels).double().mean())
                    rho_rows += [["control", csteps[p], steps[t], "all", pooled]]
                    rho_rows += [["control", csteps[p], steps[t], c, r] for c, r in enumerate(per)]
        _write_csv(staging / "rho.csv", ["kind", "t_pi", "t", "class", "rho"], rho_rows)
        _write_csv(
            staging / "accuracy.csv",
            ["kind", "t_pi", "t", "accuracy"],
            [["own", steps[p], steps[t], acc[p, t]] for p in range(k) for t in range(k)]
            + [["control", csteps[p], steps[t], acc_ctrl[p, t]] for p in range(kc) for t in range(k)],
        )
        size = merged["site_size"][0].double()
        agree = merged["agree"].double().sum(0) / (size * len(labels))  # (K, K, S)
        iou = merged["both"].double().sum(0) / merged["either"].double().sum(0).clamp_min(1)
        overlap_rows = [
            [steps[i], steps[j], site, float(agree[i, j, s]), float(iou[i, j, s])]
            for i in range(k)
            for j in range(k)
            for s, site in enumerate(sites)
        ]
        _write_csv(staging / "gate_overlap.csv", ["step_a", "step_b", "site", "agreement", "iou"], overlap_rows)
        cross = None
        if "cross_agree" in merged:
            cross = merged["cross_agree"].double().sum(0) / (size * len(labels))  # (min(K, Kc), S)
        path = merged["path_rho"]  # (N, nT, K)
        cpath = merged.get("control_path_rho")
        moments = merged["site_moments"].sum(0)  # (nT, K, S, 6)
        f_final = f[:, -1]
        soft_rows, soft_rho = [], []
        for ti, label in enumerate(temps):
            r_soft, _ = correlations(merged["soft_logits"][:, ti], f_final)
            soft_rho.append(r_soft)
            for p in range(k):
                site_r = [pearson(moments[ti, p, s]) for s in range(len(sites))]
                col = path[:, ti, p]
                soft_rows.append(
                    [label, "own", steps[p], float(col.nanmean()), float(col[~col.isnan()].std()), *site_r]
                )
            for p in range(0 if cpath is None else cpath.shape[2]):
                col = cpath[:, ti, p]
                soft_rows.append(
                    [label, "control", csteps[p], float(col.nanmean()), float(col[~col.isnan()].std())]
                    + [""] * len(sites)
                )
        _write_csv(
            staging / "soft_vs_binary.csv",
            ["T", "kind", "t_pi", "path_rho_mean", "path_rho_std", *[f"gate_r:{s}" for s in sites]],
            soft_rows,
        )
        path_mean = path.nanmean(0).numpy()  # (nT, K)
        cpath_mean = None if cpath is None else cpath.nanmean(0).numpy()
        data = {
            **m,
            "rho_pooled": rho.tolist(),
            "rho_class_mean": rho_cls.tolist(),
            "rho_control_pooled": rho_ctrl.tolist(),
            "accuracy": acc.tolist(),
            "accuracy_control": acc_ctrl.tolist(),
            "gate_agreement_with_final": agree[:, -1].tolist(),
            "gate_agreement_cross_seed": None if cross is None else cross.tolist(),
            "path_rho_mean": path_mean.tolist(),
            "control_path_rho_mean": None if cpath_mean is None else cpath_mean.tolist(),
            "rho_f_soft": soft_rho,
        }
        write_text(staging / "stability.json", json.dumps(_finite(data), indent=1) + "\n")
        labels_t = [str(s) for s in steps]
        mats = [rho, rho_cls] + ([rho_ctrl] if kc else [])
        titles = ["rho(t_pi, t), pooled", "rho(t_pi, t), mean over classes"] + (
            [f"control: pi from seed {m['control_seed']}, pooled"] if kc else []
        )
        fig = heatmap(mats, titles, labels_t, labels_t, xlabel="t (checkpoint step)", ylabel="t_pi (gates from step)")
        rows_shown = sorted({0, 1, min(2, k - 1), k // 2, k - 1})
        lines = {f"t_pi={steps[p]}": (steps, rho[p]) for p in rows_shown}
        if kc:
            lines[f"control t_pi={csteps[-1]}"] = (steps, rho_ctrl[-1])
            lines[f"control t_pi={csteps[0]}"] = (steps, rho_ctrl[0])
        overlap_lines = {site: (steps, agree[:, -1, s].numpy()) for s, site in enumerate(sites)}
        if cross is not None:
            overlap_lines.update({f"{site} vs seed": (csteps, cross[:, s].numpy()) for s, site in enumerate(sites)})
        path_lines = {f"T={label}": (steps, path_mean[ti]) for ti, label in enumerate(temps)}
        if cpath_mean is not None:
            path_lines.update({f"T={label}, control": (csteps, cpath_mean[ti]) for ti, label in enumerate(temps)})
        curve_fig = curves(
            [
                ("rho(t_pi, t) by t_pi (pooled)", "Pearson r", lines),
                ("gate agreement with the final checkpoint", "fraction of gates", overlap_lines),
                ("rho(Gamma~_T(x), pi(x)), final model", "mean Pearson r over x", path_lines),
            ],
            xlabel="step",
        )
        table = [["t_pi", "t", "rho_pooled", "rho_class_mean", "accuracy_pi"]] + [
            [steps[p], steps[t], float(rho[p, t]), float(rho_cls[p, t]), float(acc[p, t])]
            for p in range(k)
            for t in range(k)
        ]
        summary = {
            "rho_init_gates_final": float(rho[0, -1]),
            "rho_first_step_gates_final": float(rho[1, -1]) if k > 1 else float("nan"),
            "rho_control_final_gates_final": float(rho_ctrl[-1, -1]) if kc else float("nan"),
            "rho_control_init_gates_final": float(rho_ctrl[0, -1]) if kc else float("nan"),
            **{f"rho_f_soft_T{label}": r for label, r in zip(temps, soft_rho)},
        }
        caption = "Pearson r between f^(t)(X) and f^(t) run with the binary gates of checkpoint t_pi"
        return Outputs(
            {
                "rho_heatmap": (figure_image(fig), caption),
                "stability_curves": (figure_image(curve_fig), "rho rows, gate agreement, rho(Gamma_T, pi)"),
            },
            table,
            summary,
            [
                {
                    "method": "final_model",
                    "temperature": float(label),
                    "rho_f_soft_vs_f": r,  # Pearson(f_Gamma_T(X), f(X))
                    "path_rho_final_gates": float(path_mean[ti, -1]),  # mean rho(Gamma_T(x), pi_final(x))
                }
                for ti, (label, r) in enumerate(zip(temps, soft_rho))
            ],
        )


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows])
    write_text(path, buf.getvalue())
