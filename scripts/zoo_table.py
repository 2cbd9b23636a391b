"""The model zoo under the deep-network rules: gated call sites per rule, forward bit for bit, agreement with the
independent reference (tests/reference_deep.py), in float64 with random weights.

Run: .venv/bin/python scripts/zoo_table.py [--models vit_b_16 swin_t ...] [--size 224]
Prints a Markdown table: model | call sites per kind | ops no rule covers | forward torch.equal | cosine to the
reference (min over the batch) | max relative difference.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

from excitation_pullbacks import build_model, excitation, preset, pullback
from excitation_pullbacks.gating import UngatedActivationWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' independent reference
from reference_deep import reference_pullback

MODELS = [
    "vit_b_16",
    "swin_t",
    "swin_v2_t",
    "maxvit_t",
    "convnext_tiny",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "timm/pvt_v2_b1",
    "timm/deit_small_patch16_224",
    "timm/convnext_tiny",
]
KINDS = ("relu", "silu", "gelu", "maxpool", "norm", "attention")


def row(name: str, size: int, batch: int) -> str:
    torch.manual_seed(0)
    # random weights; build_model draws torchvision ViT's zero-initialised head (randomize_zero_heads)
    model = build_model(name, weights=None).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 3, size, size, dtype=torch.float64) * 2 - 1
    options = preset("semantic", attention_temperature=0.7)  # T != 1: the attention rule is not the identity
    xr = x.clone().requires_grad_(True)
    plain = model(xr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UngatedActivationWarning)
        with excitation(model, options) as report:
            gated = model(xr)
    ungated = sorted({str(w.message).split(" (")[0].removeprefix("excitation: no rule covers ") for w in caught})
    start = time.perf_counter()
    ours = pullback(model, x, 3, options)
    reference = {
        "relu": ("normal_cdf", 0.6),
        "gelu": 1.0,
        "silu": 1.6,
        "norm": True,
        "attention": (0.7, False),
        "maxpool": (0.3, True),
    }
    ref, calls = reference_pullback(copy.deepcopy(model), x, 3, reference)
    a, b = ours.flatten(1), ref.flatten(1)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).min().item()  # no eps: random-weight gradients are tiny
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    counts = [report.calls(k) for k in KINDS]
    same = all(report.calls(k) == calls.get(k, 0) for k in KINDS)
    cells = " | ".join(str(c) for c in counts)
    return (
        f"| {name} | {cells} | {', '.join(ungated) or '-'} | {torch.equal(plain, gated)} | "
        f"{cos:.12f} | {rel:.1e} | {'yes' if same else 'NO ' + str(calls)} | {time.perf_counter() - start:.0f} |"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    print(f"# float64, random weights, batch {args.batch}, {args.size} px, preset semantic with attention T=0.7")
    print("| model | " + " | ".join(KINDS) + " | no rule | forward equal | min cos | max rel diff | same sites | s |")
    print("|---" * (len(KINDS) + 7) + "|")
    for name in args.models:
        try:
            print(row(name, args.size, args.batch), flush=True)
        except Exception as err:  # noqa: BLE001  (one failing model must not hide the others)
            print(f"| {name} | error: {type(err).__name__}: {err} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
