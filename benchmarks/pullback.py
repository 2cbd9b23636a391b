"""Side-by-side cost of excitation pullbacks vs the vanilla input gradient (and vs the paper's listings).

For each architecture (random weights; timings do not depend on them) at batch N, size S:
  vanilla        torch.autograd.grad of the target logits, parameters requiring grad (as users write it)
  vanilla-frozen the same with parameters frozen (what the engine does internally)
  pullback       excitation_pullbacks.pullback, sigmoid T=0.3, softmax pool T=0.3
  listing        the paper's listings: deep copy with every nn.ReLU / nn.MaxPool2d module swapped for a
                 save-z autograd ReLU and an unfold softmax pool with the strike-through trick (it misses
                 DenseNet's functional relu, as module swapping does)
and the N x K grid: one pullback call with (N, K) targets vs N*K independent (image, target) pairs in
one batch. Times are medians over repeats, methods interleaved; peak memory is the growth of the
process's peak RSS after a reset (CPU, Linux) or torch.cuda.max_memory_allocated (GPU), each method in a fresh subprocess.

Run: ``.venv/bin/python benchmarks/pullback.py``; ``--help`` for options.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from excitation_pullbacks import ImageNetInput, pullback

METHODS = ("vanilla", "vanilla-frozen", "pullback", "listing")


# -- the paper's listings, as written there (module swap) --------------------------------------------
class _ListingReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, temperature=0.3):
        ctx.save_for_backward(z)
        ctx.temperature = temperature
        return F.relu(z)

    @staticmethod
    def backward(ctx, grad_output):
        (z,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(z / ctx.temperature), None


class _ListingReLU(nn.Module):
    def forward(self, z):
        return _ListingReLUFunction.apply(z, 0.3)


class _ListingSoftMaxPool2d(nn.MaxPool2d):
    def forward(self, x):
        b, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        cols = F.unfold(x, kernel_size=k, stride=s, padding=p).view(b, c, k * k, -1)
        soft = (cols * F.softmax(cols / 0.3, dim=2)).sum(dim=2)
        soft = soft.view(b, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        hard = F.max_pool2d(x, k, s, p, self.dilation, ceil_mode=self.ceil_mode)
        return hard.detach() + (soft - soft.detach())


def listing_model(model: nn.Module) -> nn.Module:
    """A deep copy with the paper's Listing 1/2 modules swapped in by a recursive function."""
    model = copy.deepcopy(model)

    def visit(parent):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, _ListingReLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, _ListingSoftMaxPool2d(child.kernel_size, child.stride, child.padding))
            else:
                visit(child)

    visit(model)
    return model


# -- one measured call per method ------------------------------------------------------------------
def _grad(model, x, t):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
    return g


def make_call(method: str, model: nn.Module, listing: nn.Module | None):
    if method == "vanilla":
        return lambda x, t: _grad(model, x, t)
    if method == "vanilla-frozen":
        return lambda x, t: pullback(model, x, t, temperature=0)
    if method == "pullback":
        return lambda x, t: pullback(model, x, t, temperature=0.3)
    if method == "listing":
        return lambda x, t: _grad(listing, x, t)
    raise ValueError(method)


def build(arch: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return ImageNetInput(tvm.get_model(arch, weights=None)).eval().to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(arch, device, batch, size, repeats, warmup=1):
    """{method: [seconds per call]} with the methods interleaved round-robin."""
    model = build(arch, device)
    listing = listing_model(model)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    t = torch.arange(batch, device=device) * 37 % 1000
    calls = {m: make_call(m, model, listing) for m in METHODS}
    times = {m: [] for m in METHODS}
    for r in range(warmup + repeats):
        for m, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call(x, t)
            _sync(device)
            if r >= warmup:
                times[m].append(time.perf_counter() - start)
    return times


def time_grid(arch, device, n, k, size, repeats, warmup=1):
    """Shared-forward N x K grid vs N*K independent (image, target) pairs in one batch."""
    model = build(arch, device)
    x = torch.rand(n, 3, size, size, device=device) * 2 - 1
    classes = torch.tensor([0, 482, 497, 569, 574, 9][:k] + list(range(10, 10 + max(0, k - 6))), device=device)
    grid_t = classes.expand(n, k)
    pairs_x = x[:, None].expand(n, k, *x.shape[1:]).reshape(n * k, *x.shape[1:])
    pairs_t = grid_t.reshape(-1)
    out = {"grid": [], "pairs": []}
    for r in range(warmup + repeats):
        for name, call in (
            ("grid", lambda: pullback(model, x, grid_t)),
            ("pairs", lambda: pullback(model, pairs_x, pairs_t)),
        ):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            if r >= warmup:
                out[name].append(time.perf_counter() - start)
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory(arch, method, device, batch, size) -> int:
    """Peak memory growth of one call (bytes); run in a fresh process (see ``main --memory-child``)."""
    model = build(arch, device)
    listing = listing_model(model) if method == "listing" else None
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    t = torch.arange(batch, device=device) * 37 % 1000
    call = make_call(method, model, listing)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call(x, t)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    call(x, t)
    return (_status_kib("VmHWM") - base) * 1024


def _memory_in_child(arch, method, device, batch, size) -> int:
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        arch,
        method,
        "--device",
        device,
        "--batch",
        str(batch),
        "--size",
        str(size),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "vgg11_bn", "densenet121"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--grid", default="5x6", help="N x K for the grid comparison ('' to skip)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--memory-child", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(peak_memory(*args.memory_child, args.device, args.batch, args.size))
        return 0

    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"# device {args.device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, {args.size} px, median of {args.repeats}"
    )
    results = {"device": args.device, "batch": args.batch, "size": args.size, "repeats": args.repeats, "archs": {}}
    print(
        "\n| model | vanilla s | vanilla-frozen s | pullback s | listing s | pullback/vanilla time | "
        "listing/vanilla time | pullback/vanilla mem | listing/vanilla mem |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        times = time_methods(arch, args.device, args.batch, args.size, args.repeats)
        med = {m: statistics.median(v) for m, v in times.items()}
        mem = (
            {}
            if args.no_memory
            else {m: _memory_in_child(arch, m, args.device, args.batch, args.size) for m in METHODS}
        )
        results["archs"][arch] = {"time_s": times, "median_s": med, "peak_bytes": mem}
        mem_cols = (
            f"{mem['pullback'] / mem['vanilla']:.2f}x | {mem['listing'] / mem['vanilla']:.2f}x" if mem else "- | -"
        )
        print(
            f"| {arch} | {med['vanilla']:.3f} | {med['vanilla-frozen']:.3f} | {med['pullback']:.3f} | "
            f"{med['listing']:.3f} | {med['pullback'] / med['vanilla']:.2f}x | "
            f"{med['listing'] / med['vanilla']:.2f}x | {mem_cols} |",
            flush=True,
        )
    if mem:
        print(
            "\npeak memory growth (MiB): "
            + "; ".join(
                f"{a}: " + ", ".join(f"{m} {v['peak_bytes'][m] / 2**20:.0f}" for m in METHODS)
                for a, v in results["archs"].items()
            )
        )
    if args.grid:
        n, k = (int(v) for v in args.grid.lower().split("x"))
        print(f"\n| model | grid {n}x{k} (one call) s | {n * k} pairs in one batch s | ratio |")
        print("|---|---|---|---|")
        results["grid"] = {}
        for arch in args.archs:
            g = time_grid(arch, args.device, n, k, args.size, args.repeats)
            mg, mp = statistics.median(g["grid"]), statistics.median(g["pairs"])
            results["grid"][arch] = g
            print(f"| {arch} | {mg:.3f} | {mp:.3f} | {mg / mp:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
