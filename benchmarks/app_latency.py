"""Latency of the explorer's requests on this machine: median of 5 runs of the functions the page calls.

Run: .venv/bin/python benchmarks/app_latency.py [--device cpu] [--repeats 5]
Rows: a digits CNN pullback (both panels: vanilla + excitation), a ResNet50 (random weights, 224 px) pullback
(both panels), a 10-step ResNet50 ascent (excitation and vanilla trajectories, 20 steps in all).
The page replays a gate's pullback once it has used it ``replays.WARMUP`` times at an image size; the rows'
runs (a warm-up and ``--repeats``) cross that point in the ascent row only.
Then the cost of one image: the excitation panel's pullback (default gates), eager and replayed, against the
plain torch input gradient (parameters frozen, ``torch.autograd.grad`` of the target logit) at batch 1 on one
thread, as thread CPU time (what the call itself computes, not the waits a busy machine adds), the three
interleaved, median of ``--batch1-repeats`` (ResNet50: a twentieth of that), and the replay's one-time trace;
skip with ``--batch1-repeats 0``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
from PIL import Image

from excitation_pullbacks import GateOptions, pullback
from excitation_pullbacks.app.images import digits_folder, list_images, open_image, preprocess
from excitation_pullbacks.app.models import ModelSpec, load_model
from excitation_pullbacks.app.panels import AscentSettings, gradients, trajectories
from excitation_pullbacks.replay import ReplayedPullback


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch1_times(model, x: torch.Tensor, target: int, gate: GateOptions, repeats: int) -> dict[str, float]:
    """Median thread CPU seconds for one image x (1, C, H, W) on one thread, interleaved: ``vanilla`` (the torch
    input gradient), ``pullback`` (the engine, eager) and ``replayed`` (what the page runs once it keeps using
    ``gate``: :class:`ReplayedPullback`), and ``trace``, the replay's one-time trace (wall seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def vanilla():
        for p in params:
            p.requires_grad_(False)
        try:
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(model(xg)[:, target].sum(), xg)
        finally:
            for p in params:
                p.requires_grad_(True)

    def excitation():
        pullback(model, x, target, gate)

    replay = ReplayedPullback(model, gate)

    def replayed():
        replay(x, target)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        replayed()
        trace = time.perf_counter() - start
        if not replay.replayed:
            raise RuntimeError(f"the pullback was not replayed: {replay.reason}")
        times: dict = {vanilla: [], excitation: [], replayed: []}
        for fn in times:
            fn()  # warm-up (the kernel library, allocator caches)
        order = list(times)
        for i in range(repeats):
            for fn in order[i % 3 :] + order[: i % 3]:
                start = time.thread_time()
                fn()
                times[fn].append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return {fn.__name__.replace("excitation", "pullback"): statistics.median(ts) for fn, ts in times.items()} | {
        "trace": trace
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch1-repeats", type=int, default=300)
    args = p.parse_args()
    gate = GateOptions()
    digits = load_model(ModelSpec("digits_cnn", "DEFAULT"), args.device)
    xd = preprocess(open_image(list_images(digits_folder())[3]), 32, 32).to(digits.device)
    resnet = load_model(ModelSpec("resnet50", None), args.device)
    photo = Image.effect_mandelbrot((320, 240), (-2.0, -1.2, 1.0, 1.2), 100).convert("RGB")
    xr = preprocess(photo, 256, 224).to(resnet.device)
    rows = [
        ("digits_cnn pullback (vanilla + excitation, 32 px)", lambda: gradients(digits.model, xd, 3, gate)),
        ("resnet50 pullback (vanilla + excitation, 224 px)", lambda: gradients(resnet.model, xr, 0, gate)),
        (
            "resnet50 ascent, 10 steps (excitation + vanilla)",
            lambda: trajectories(resnet.model, xr, 0, gate, AscentSettings(10, 20.0, 100.0)),
        ),
    ]
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()}")
    for name, fn in rows:
        print(f"{name:55s} {median_seconds(fn, args.repeats):8.3f} s", flush=True)
    if args.batch1_repeats > 0:
        print(
            "batch 1, one thread, thread CPU time: vanilla gradient, pullback (eager), replayed pullback (trace once)"
        )
        for name, model, x, n in (
            ("digits_cnn, 32 px", digits.model, xd, args.batch1_repeats),
            ("resnet50, 224 px", resnet.model, xr, max(3, args.batch1_repeats // 20)),
        ):
            t = batch1_times(model, x, 3, gate, n)
            van, pb, rp = t["vanilla"], t["pullback"], t["replayed"]
            print(
                f"  {name:20s} {van * 1e3:8.2f} ms {pb * 1e3:8.2f} ms ({pb / van:.2f}x) {rp * 1e3:8.2f} ms "
                f"({rp / van:.2f}x; trace {t['trace']:.2f} s), median of {n}",
                flush=True,
            )
    print(f"load after:  {subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()}")


if __name__ == "__main__":
    main()
