"""Each Quantus-style metric of excitation_pullbacks.metrics against Quantus 0.6 on the same inputs, maps and
random draws: seconds of each side and the largest |ours - quantus| over the images.

The settings are the published ones (metrics.PUBLISHED) scaled to the image size, except where the published
code subclasses Quantus (infidelity with optimal scaling, faithfulness correlation over every patch): those two
rows run Quantus's own definition (``scaling="none"``; 100 random subsets of 224 features). Both sides compute in
float64 by default (Quantus runs the model on ``torch.Tensor(x)``, so torch's default dtype is set while it runs;
``--dtype float32`` times both sides in float32, where batching many perturbed images pays off more); the
draws come from numpy's global RNG in Quantus's order and are passed to ours. Maps: the vanilla gradient plus
a tiny seeded jitter (tied features are ordered differently by numpy's quicksort). CPU, one run each.

    .venv/bin/python benchmarks/quantus_metrics.py                         # digits CNN (N=8), resnet18 (N=4), 32 px
    .venv/bin/python benchmarks/quantus_metrics.py --models digits --n 16
    .venv/bin/python benchmarks/quantus_metrics.py --threads 1 --dtype float32
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torchvision
from captum.attr import Saliency

from excitation_pullbacks import metrics as M
from excitation_pullbacks.models import digits_images, load_digits_cnn


def gradient(model, x, t):
    return Saliency(model).attribute(x.detach().requires_grad_(True), target=t, abs=False).detach()


def quantus_gradient(model, inputs, targets, **kwargs):
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.get_default_dtype())
    return gradient(model, x, torch.as_tensor(np.asarray(targets)).long()).numpy()


def case(name: str, n: int, size: int):
    if name == "digits":
        model = load_digits_cnn().double().eval()
        x, y = digits_images("test", size=size)
        return model, x[:n].double(), y[:n], 10
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=1000)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model = model.double().eval()
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    return model, x, torch.arange(n) * 97 % 1000, 1000


def rows(quantus, protocol, n: int, size: int, classes: int):
    """(name, our call(model, x, y, a, draws), Quantus metric, draw function, needs explain_func)."""
    inf, fc = protocol.settings("infidelity"), protocol.settings("faithfulness_correlation")
    fe, mc = protocol.settings("faithfulness_estimate"), protocol.settings("monotonicity_correlation")
    ms, rl = protocol.settings("max_sensitivity"), protocol.settings("random_logit")
    features = 3 * size * size
    blocks = sum((size // p) ** 2 for p in inf["patch_sizes"])
    steps = features // fe["features_in_step"]
    uniform = {"uniform_low": -1.0, "uniform_high": 1.0}

    def fc_subsets():
        out = []
        for _ in range(100):
            out.append(np.stack([np.random.choice(features, 224, replace=False) for _ in range(n)]))
        return torch.from_numpy(np.stack(out))

    off = {}

    def off_targets():
        off["r"] = torch.from_numpy(np.random.randint(0, classes - 1, n))

    return [
        (
            "infidelity",
            lambda m, x, y, a, d: M.infidelity(m, x, y, a, **dict(inf, scaling="none"), draws=d),
            quantus.Infidelity(
                perturb_patch_sizes=list(inf["patch_sizes"]),
                n_perturb_samples=inf["samples"],
                perturb_baseline="uniform",
                perturb_func_kwargs=uniform,
                disable_warnings=True,
            ),
            lambda: torch.from_numpy(np.random.uniform(-1, 1, (inf["samples"], blocks, n))),
            False,
        ),
        (
            "faithfulness_correlation",
            lambda m, x, y, a, d: M.faithfulness_correlation(
                m, x, y, a, runs=100, subset_size=224, baseline=fc["baseline"], absolute=True, subsets=d
            ),
            quantus.FaithfulnessCorrelation(
                nr_runs=100,
                subset_size=224,
                perturb_baseline=0.0,
                abs=True,
                return_aggregate=False,
                disable_warnings=True,
            ),
            fc_subsets,
            False,
        ),
        (
            "faithfulness_estimate",
            lambda m, x, y, a, d: M.faithfulness_estimate(m, x, y, a, **fe),
            quantus.FaithfulnessEstimate(
                features_in_step=fe["features_in_step"], perturb_baseline=0.0, abs=True, disable_warnings=True
            ),
            lambda: None,
            False,
        ),
        (
            "monotonicity_correlation",
            lambda m, x, y, a, d: M.monotonicity_correlation(m, x, y, a, **mc, draws=d),
            quantus.MonotonicityCorrelation(
                nr_samples=mc["samples"],
                features_in_step=mc["features_in_step"],
                perturb_baseline="uniform",
                perturb_func_kwargs=uniform,
                abs=True,
                eps=mc["eps"],
                disable_warnings=True,
            ),
            lambda: torch.from_numpy(np.random.uniform(-1, 1, (steps, mc["samples"], n))),
            False,
        ),
        (
            "max_sensitivity",
            lambda m, x, y, a, d: M.max_sensitivity(m, x, y, gradient, a, **ms, noise=d),
            quantus.MaxSensitivity(nr_samples=ms["samples"], lower_bound=ms["radius"], disable_warnings=True),
            lambda: torch.from_numpy(
                np.stack([np.random.uniform(-ms["radius"], ms["radius"], (n, features)) for _ in range(ms["samples"])])
            ).reshape(ms["samples"], n, 3, size, size),
            True,
        ),
        (
            "random_logit",
            lambda m, x, y, a, d: M.random_logit(m, x, y, gradient, a, off_targets=off["r"] + (off["r"] >= y).long()),
            quantus.RandomLogit(
                num_classes=classes,
                seed=rl["seed"],
                similarity_func=quantus.similarity_func.correlation_pearson,
                disable_warnings=True,
            ),
            lambda: (np.random.seed(rl["seed"]), off_targets())[1],
            True,
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["digits", "resnet18"], choices=["digits", "resnet18"])
    p.add_argument("--n", type=int, default=None, help="images (default: 8 digits, 4 resnet18)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    a = p.parse_args(argv)
    import quantus

    warnings.simplefilter("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"{'model':9} {'metric':26} {'N':>3} {'px':>4} {'ours s':>8} {'quantus s':>9} {'ratio':>6} {'max |diff|':>10}"
    )
    for name in a.models:
        size = 32
        n = a.n or (8 if name == "digits" else 4)
        model, x, y, classes = case(name, n, size)
        dtype = getattr(torch, a.dtype)
        model, x = model.to(dtype), x.to(dtype)
        maps = gradient(model, x, y)
        jitter = torch.randn(maps.shape, generator=torch.Generator().manual_seed(2), dtype=maps.dtype)
        maps = maps + 1e-6 * maps.abs().max() * jitter
        protocol = M.PUBLISHED.scaled(size)
        for metric, ours_fn, theirs, draw, explains in rows(quantus, protocol, n, size, classes):
            a_in = gradient(model, x, y) if explains else maps
            np.random.seed(5)
            draws = draw()
            t0 = time.perf_counter()
            ours = ours_fn(model, x, y, a_in, draws).numpy()
            t_ours = time.perf_counter() - t0
            np.random.seed(5)
            torch.set_default_dtype(dtype)
            try:
                t0 = time.perf_counter()
                extra = {"explain_func": quantus_gradient} if explains else {}
                q = np.asarray(
                    theirs(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a_in.numpy(), **extra),
                    dtype=np.float64,
                )
                t_q = time.perf_counter() - t0
            finally:
                torch.set_default_dtype(torch.float32)
            diff = float(np.max(np.abs(ours - q)))
            print(
                f"{name:9} {metric:26} {n:>3} {size:>4} {t_ours:>8.2f} {t_q:>9.2f} {t_q / t_ours:>6.1f} {diff:>10.2e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
