"""Time deletion/insertion (excitation_pullbacks.metrics) against Quantus PixelFlipping on the same inputs.

Both compute the same curves (checked here): ``metrics.deletion(..., include_start=False, auc_spacing="step")``
equals Quantus 0.6 ``PixelFlipping(features_in_step=C*H*W/steps)`` on channel-reduced maps; insertion is
PixelFlipping started from the baseline with a perturbation that copies the original's pixels. Quantus
advances all N images one step per forward pass (steps passes of N images); ours scores the N * (steps + 1)
perturbed images ``--batch-size`` at a time. Runs are interleaved; medians of ``--repeats`` are reported.

    .venv/bin/python benchmarks/metrics.py                       # resnet18, 48 x 48, N = 8, CPU
    .venv/bin/python benchmarks/metrics.py --model small --size 32
    .venv/bin/python benchmarks/metrics.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

from excitation_pullbacks import metrics as M


def build(name: str, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None, num_classes=classes)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["resnet18", "small"], default="resnet18")
    p.add_argument("--size", type=int, default=48, help="48: 24 steps hold whole pixels in Quantus too")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=24, help="curve steps; C*H*W/steps must divide H*W (Quantus)")
    p.add_argument("--batch-size", type=int, default=64, help="our perturbed images per forward pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    import quantus

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model = build(a.model, 10).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(a.n, 3, a.size, a.size, generator=g) * 2 - 1).to(device)
    maps = torch.randn(a.n, 1, a.size, a.size, generator=g).to(device)
    t = torch.arange(a.n, device=device) % 10
    c, hw = 3, a.size * a.size
    if (c * hw) % a.steps or hw % (c * hw // a.steps):
        raise SystemExit(f"--steps {a.steps}: C*H*W/steps must be an integer dividing H*W for Quantus")
    fis = c * hw // a.steps
    # Quantus steps through features (pixel x channel); its steps hold whole pixels only if steps divides H*W
    exact = hw % a.steps == 0 and fis % c == 0
    base = M.gaussian_blur(x, sigma=5.0)
    source = x.reshape(a.n, -1).cpu().numpy()

    def reveal(arr, indices, source, **kwargs):
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = source[rows, indices]
        return out

    common = {"features_in_step": fis, "abs": False, "normalise": False, "disable_warnings": True}
    q_del = quantus.PixelFlipping(perturb_baseline=0.0, **common)
    q_ins = quantus.PixelFlipping(perturb_func=reveal, perturb_func_kwargs={"source": source}, **common)
    xs, ms, ts, bs = x.cpu().numpy(), maps.cpu().numpy(), t.cpu().numpy(), base.cpu().numpy()
    dev = "cuda" if device.type == "cuda" else "cpu"

    def quantus_run():
        d = q_del(model=model, x_batch=xs, y_batch=ts, a_batch=ms, device=dev, softmax=True, batch_size=64)
        i = q_ins(model=model, x_batch=bs, y_batch=ts, a_batch=ms, device=dev, softmax=True, batch_size=64)
        return np.asarray(d), np.asarray(i)

    opts = {
        "steps": a.steps,
        "include_start": False,
        "auc_spacing": "step",
        "batch_size": a.batch_size,
        "return_curves": True,
    }

    def ours_run():
        _, d = M.deletion(model, x, maps, t, baseline=0.0, **opts)
        _, i = M.insertion(model, x, maps, t, baseline="blur", blur_sigma=5.0, **opts)
        sync(device)
        return d.cpu().numpy(), i.cpu().numpy()

    perturbed = torch.cat([x, base]).repeat(a.steps + 1, 1, 1, 1)  # as many images as ours scores

    def floor_run():  # the model's forward passes alone, at our batch size
        with torch.no_grad():
            for i in range(0, perturbed.shape[0], a.batch_size):
                model(perturbed[i : i + a.batch_size])
        sync(device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qd, qi = quantus_run()  # warm-up, and the agreement check
        od, oi = ours_run()
        diff = max(np.abs(qd - od).max(), np.abs(qi - oi).max())
        times = {"ours": [], "quantus": [], "forward": []}
        for _ in range(a.repeats):
            for name, fn in (("ours", ours_run), ("quantus", quantus_run), ("forward", floor_run)):
                sync(device)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(
        f"model {a.model}, images {a.n} x 3 x {a.size} x {a.size}, steps {a.steps}, device {device}, "
        f"threads {torch.get_num_threads()}, repeats {a.repeats}"
    )
    if exact:
        print(f"deletion + insertion curves agree with Quantus: max |difference| {diff:.2e}")
    else:
        print(
            f"steps {a.steps} split pixels' channels across Quantus steps: curves differ by up to {diff:.2e} "
            f"(steps dividing H*W, and a multiple of 3, give the same curves)"
        )
    print(f"(forward: the model alone on the {perturbed.shape[0]} images ours scores, {a.batch_size} per pass)")
    for k in ("ours", "quantus", "forward"):
        print(
            f"  {k:8s} median {med[k] * 1e3:9.1f} ms  min {low[k] * 1e3:9.1f} ms  "
            f"(runs: {', '.join(f'{s * 1e3:.1f}' for s in times[k])})"
        )
    print(
        f"speed ratio quantus / ours: {med['quantus'] / med['ours']:.1f}x (medians), "
        f"{low['quantus'] / low['ours']:.1f}x (minima); ours / forward alone: {med['ours'] / med['forward']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
