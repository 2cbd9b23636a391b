"""Side-by-side cost of excitation pullbacks vs the vanilla input gradient (and vs the paper's listings).

For each architecture (random weights; timings do not depend on them) at batch N, size S:
  vanilla            torch.autograd.grad of the target logits, parameters frozen (as the engine runs)
  vanilla-grad       the same with parameters requiring grad (as users often write it)
  pullback           excitation_pullbacks.pullback, sigmoid T=0.3, softmax pool T=0.3
  pullback-noflush   the same with subnormal floats left in the backward (EXCITATION_PULLBACKS_FLUSH=0)
  pullback-torchbn   the same with the in-place ReLUs of BatchNorm outputs backpropagated by torch ops (a
                     batch_norm recompute and a softplus backward) instead of the one-pass C kernel
                     (EXCITATION_PULLBACKS_BN_KERNEL=0)
  semantic           pullback with preset("semantic") (LayerNorm frozen, attention softened at T=1, ...)
  semantic-torchgate semantic with the normal-CDF gate's backward (GELU sites) in torch ops instead of the
                     one-pass C kernel (EXCITATION_PULLBACKS_GATE_KERNEL=0)
  semantic-noattn    the same with attention's exact gradient (semantic's T = 1 is that gradient: the native op runs)
  semantic-attn07    semantic with attention at T = 0.7: what the softened attention backward costs
  listing            the paper's listings: deep copy with every nn.ReLU / nn.MaxPool2d module swapped for a
                     save-z autograd ReLU and an unfold softmax pool with the strike-through trick
  author             the author-style module swap: every nn.ReLU replaced by a soft-gradient module (sigmoid
                     backward at T=0.3), max-pools left hard; like any module swap it misses DenseNet's
                     functional relu
  compiled-vanilla   vanilla on torch.compile(model)
  compiled-pullback  pullback on torch.compile(model)
  replayed           ReplayedPullback(model, 0.3): pullback traced once, then replayed (same bits)
Compile and trace time (the first call of the compiled and replayed methods) is reported apart from the
steady-state times.
And the N x K grid: one pullback call with (N, K) targets vs N*K independent (image, target) pairs in one
batch. Times are medians over repeats, methods interleaved (order reversed every other round); peak memory
is the growth of the process's peak RSS after a reset (CPU, Linux) or torch.cuda.max_memory_allocated (GPU),
each method in a fresh subprocess (compiled methods: after a warm-up call in that process). ``uptime`` is printed before and after.
At batch 1 a pullback costs mostly per call, not per pixel: on one CPU thread (thread CPU time, median of 400)
the shipped digits CNN at 32 px took about 2.4x vanilla (Python dispatch of each gated call, its autograd
node, the hooks, the model-state snapshot), ResNet50 at 224 px about 1.13x. On 2 cores that other work keeps
busy, wall times at 2 threads swing a hundredfold (each parallel op waits for a descheduled OpenMP thread):
compare methods on an idle machine.

Run: ``.venv/bin/python benchmarks/pullback.py``; ``--help`` for options (e.g. ``--batch 2 --size 64
--repeats 3`` for a quick check, ``--archs resnet50`` for one model, ``--archs digits_cnn --size 32`` for the
shipped digits CNN, ``--no-compile`` to skip compiling).
On a GPU the default batches are 16, 64 and 256.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
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

from excitation_pullbacks import ImageNetInput, ReplayedPullback, excitation, preset, pullback
from excitation_pullbacks.models import DIGITS_CNN, build_model, randomize_zero_heads

METHODS = (
    "vanilla",
    "vanilla-grad",
    "pullback",
    "pullback-noflush",
    "pullback-torchbn",
    "semantic",
    "semantic-torchgate",
    "semantic-noattn",
    "semantic-attn07",
    "listing",
    "author",
    "compiled-vanilla",
    "compiled-pullback",
    "replayed",
)
COMPILED = ("compiled-vanilla", "compiled-pullback")
#: Methods whose first call builds something (a compiled graph, a traced one): timed apart.
FIRST_CALL = (*COMPILED, "replayed")
#: Methods that are another method with one of the engine's switches set to 0: (variable, that method).
SWITCHED = {
    "pullback-noflush": ("EXCITATION_PULLBACKS_FLUSH", "pullback"),
    "pullback-torchbn": ("EXCITATION_PULLBACKS_BN_KERNEL", "pullback"),
    "semantic-torchgate": ("EXCITATION_PULLBACKS_GATE_KERNEL", "semantic"),
}


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
    return _swapped(model, pools=True)


def author_model(model: nn.Module) -> nn.Module:
    """A deep copy with every nn.ReLU module replaced by a soft-gradient module (max-pools stay hard)."""
    return _swapped(model, pools=False)


def _swapped(model: nn.Module, pools: bool) -> nn.Module:
    model = copy.deepcopy(model)

    def visit(parent):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, _ListingReLU())
            elif pools and isinstance(child, nn.MaxPool2d):
                setattr(parent, name, _ListingSoftMaxPool2d(child.kernel_size, child.stride, child.padding))
            else:
                visit(child)

    visit(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- one measured call per method ------------------------------------------------------------------
def _grad(model, x, t):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
    return g


def _frozen(model: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def make_call(method: str, model: nn.Module):
    """A call (x, t) -> input gradient for ``method``; the models it needs are built here."""
    if method == "vanilla":
        frozen = _frozen(model)
        return lambda x, t: _grad(frozen, x, t)
    if method == "vanilla-grad":
        return lambda x, t: _grad(model, x, t)
    if method == "pullback":
        return lambda x, t: pullback(model, x, t, temperature=0.3)
    if method in SWITCHED:
        switch, base = SWITCHED[method]
        call = make_call(base, model)

        def switched(x, t):
            os.environ[switch] = "0"
            try:
                return call(x, t)
            finally:
                del os.environ[switch]

        return switched
    if method == "semantic":
        return lambda x, t: pullback(model, x, t, preset("semantic"))
    if method == "semantic-noattn":
        return lambda x, t: pullback(model, x, t, preset("semantic", attention_temperature=None))
    if method == "semantic-attn07":
        return lambda x, t: pullback(model, x, t, preset("semantic", attention_temperature=0.7))
    if method == "listing":
        swapped = listing_model(model)
        return lambda x, t: _grad(swapped, x, t)
    if method == "author":
        swapped = author_model(model)
        return lambda x, t: _grad(swapped, x, t)
    if method == "compiled-vanilla":
        compiled = torch.compile(_frozen(model))
        return lambda x, t: _grad(compiled, x, t)
    if method == "compiled-pullback":
        compiled = torch.compile(model)
        return lambda x, t: pullback(compiled, x, t, temperature=0.3)
    if method == "replayed":
        return ReplayedPullback(model, temperature=0.3)
    raise ValueError(method)


def build(arch: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == DIGITS_CNN:  # the shipped trained digits CNN (32 px: pass --size 32)
        return build_model(DIGITS_CNN, "DEFAULT").eval().to(device)
    model = ImageNetInput(tvm.get_model(arch, weights=None)).eval()
    randomize_zero_heads(model)  # torchvision starts ViT's head at zero (every gradient 0): give it weights
    return model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _inputs(batch, size, device):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    return x, torch.arange(batch, device=device) * 37 % 1000


def time_methods(arch, device, batch, size, repeats, methods, warmup=1):
    """({method: [seconds per call]}, {compiled method: seconds of its first call}), the methods interleaved
    round-robin after a warm-up call each (for a compiled method that call compiles it), in reverse order every
    other round: on CPU the memory a method leaves to the allocator changes the page faults of the next one."""
    model = build(arch, device)
    x, t = _inputs(batch, size, device)
    calls = {m: make_call(m, model) for m in methods}
    times = {m: [] for m in methods}
    first = {}
    for m, call in calls.items():
        start = time.perf_counter()
        call(x, t)
        _sync(device)
        first[m] = time.perf_counter() - start
    for r in range(warmup - 1 + repeats):
        for m, call in list(calls.items())[:: 1 if r % 2 == 0 else -1]:
            _sync(device)
            start = time.perf_counter()
            call(x, t)
            _sync(device)
            if r >= warmup - 1:
                times[m].append(time.perf_counter() - start)
    return times, {m: first[m] for m in methods if m in FIRST_CALL}


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


def gate_exp_cost(arch, device, batch, size, repeats) -> float:
    """Seconds the soft gates' backward adds at least: over every gated ReLU input z of one forward pass,
    the median time of the one-pass sigmoid gate (softplus_backward, an exp per element) minus that of the hard
    gate (threshold_backward); plus, per soft max-pool, one exp over its window terms (N, C, Ho, Wo, kh * kw).
    vanilla + this is the floor of a pullback whose only extra work is the gates' exponentials."""
    model = build(arch, device)
    x, _ = _inputs(batch, size, device)
    shapes = []

    def pool_terms(module, args, out):
        k = module.kernel_size
        shapes.append(("pool", (out.numel() * (k * k if isinstance(k, int) else k[0] * k[1]),)))

    hooks = [m.register_forward_hook(pool_terms) for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    with torch.no_grad(), excitation(model, observer=lambda site, z, gate: shapes.append((site.kind, z.shape))):
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for kind, shape in shapes:
        if kind != "pool":
            continue
        terms, times = torch.randn(shape, device=device), []
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            torch.exp(terms)
            _sync(device)
            times.append(time.perf_counter() - start)
        total += statistics.median(times[1:])
    for kind, shape in shapes:
        if kind != "relu":
            continue
        z = torch.randn(shape, device=device)
        g = torch.randn(shape, device=device)
        soft, hard = [], []
        for _ in range(repeats + 1):
            for op, op_args, out in (
                (torch.ops.aten.softplus_backward, (g, z, 1 / 0.3, 20.0), soft),
                (torch.ops.aten.threshold_backward, (g, z, 0.0), hard),
            ):
                _sync(device)
                start = time.perf_counter()
                op(*op_args)
                _sync(device)
                out.append(time.perf_counter() - start)
        total += statistics.median(soft[1:]) - statistics.median(hard[1:])
    return total


def subnormal_fraction(arch, device, batch, size) -> tuple[float, float]:
    """Fractions of subnormal entries among the gradients reaching the convolutions and linear layers in one
    backward of the pullback, left unflushed (EXCITATION_PULLBACKS_FLUSH=0) and flushed."""
    model = build(arch, device)
    x, t = _inputs(batch, size, device)
    out = []
    for flush in ("0", "1"):
        counts = [0, 0]

        def hook(module, grad_output, counts=counts):
            g = grad_output[0]
            if g is not None and g.is_floating_point():
                tiny = torch.finfo(g.dtype).tiny
                counts[0] += int(((g != 0) & (g.abs() < tiny)).sum())
                counts[1] += g.numel()

        handles = [
            m.register_full_backward_pre_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        os.environ["EXCITATION_PULLBACKS_FLUSH"] = flush
        try:
            pullback(model, x, t, temperature=0.3)
        finally:
            del os.environ["EXCITATION_PULLBACKS_FLUSH"]
            for h in handles:
                h.remove()
        out.append(counts[0] / max(counts[1], 1))
    return out[0], out[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory(arch, method, device, batch, size) -> int:
    """Peak memory growth of one call (bytes); run in a fresh process (see ``main --memory-child``)."""
    model = build(arch, device)
    x, t = _inputs(batch, size, device)
    call = make_call(method, model)
    if method in FIRST_CALL:
        call(x, t)  # compile or trace first: the peak of the steady-state call, not of the compiler
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


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def _mib(v: int) -> str:
    return f"{v / 2**20:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "vgg11_bn", "densenet121"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 16 on CPU; 16 64 256 on GPU)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled methods")
    p.add_argument("--grid", default="", help="N x K for the grid comparison, e.g. 5x6 ('' skips it)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-floor", action="store_true", help="skip timing the gates' exps alone (the floor column)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--subnormals", action="store_true", help="report the subnormal share of the backward's gradients")
    p.add_argument("--memory-child", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batches = args.batch or ([16, 64, 256] if args.device.startswith("cuda") else [16])
    if args.memory_child:
        print(peak_memory(*args.memory_child, args.device, batches[0], args.size))
        return 0
    methods = [m for m in args.methods if not (args.no_compile and m in COMPILED)]
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")  # the reference of every ratio

    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"# device {args.device} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.size} px, median of {args.repeats}\n# load before: {_uptime()}"
    )
    results = {"device": args.device, "size": args.size, "repeats": args.repeats, "runs": []}
    others = [m for m in methods if m != "vanilla"]
    floor = "" if args.no_floor else " floor s (x) |"
    head = "| model | batch | vanilla s | " + " | ".join(f"{m} s (x)" for m in others) + " |"
    rows, mem_rows, compile_rows = [], [], []
    print(
        "\ntime: median seconds per call (ratio to vanilla); floor: vanilla + the gates' exps alone (the soft ReLU's"
        " sigmoid, one exp per soft-pool window term)"
        "\n" + head + floor
    )
    print("|---" * (3 + len(others) + bool(floor)) + "|")
    for arch in args.archs:
        for batch in batches:
            times, compile_s = time_methods(arch, args.device, batch, args.size, args.repeats, methods)
            med = {m: statistics.median(v) for m, v in times.items()}
            cells = " | ".join(f"{med[m]:.3f} ({med[m] / med['vanilla']:.2f}x)" for m in others)
            rows.append(f"| {arch} | {batch} | {med['vanilla']:.3f} | {cells} |")
            if floor:
                med["floor"] = med["vanilla"] + gate_exp_cost(arch, args.device, batch, args.size, args.repeats)
                rows[-1] += f" {med['floor']:.3f} ({med['floor'] / med['vanilla']:.2f}x) |"
            print(rows[-1], flush=True)
            mem = (
                {} if args.no_memory else {m: _memory_in_child(arch, m, args.device, batch, args.size) for m in methods}
            )
            if mem:
                cells = " | ".join(f"{_mib(mem[m])} ({mem[m] / mem['vanilla']:.2f}x)" for m in others)
                mem_rows.append(f"| {arch} | {batch} | {_mib(mem['vanilla'])} | {cells} |")
            if compile_s:
                compile_rows.append(
                    f"| {arch} | {batch} | " + " | ".join(f"{v:.1f}" for v in compile_s.values()) + " |"
                )
            results["runs"].append(
                {
                    "arch": arch,
                    "batch": batch,
                    "time_s": times,
                    "median_s": med,
                    "peak_bytes": mem,
                    "compile_s": compile_s,
                }
            )
    if mem_rows:
        print(
            "\npeak memory growth: MiB (ratio to vanilla)\n"
            + head.replace(" s |", " MiB |").replace(" s (x)", " MiB (x)")
        )
        print("|---" * (3 + len(others)) + "|")
        print("\n".join(mem_rows))
    if compile_rows:
        names = [m for m in methods if m in FIRST_CALL]
        print(
            "\nfirst call of the compiled and replayed methods (compile or trace + run), s\n| model | batch | "
            + " | ".join(names)
            + " |"
        )
        print("|---" * (2 + len(names)) + "|")
        print("\n".join(compile_rows))
    if args.subnormals:
        print("\nsubnormal entries among the gradients reaching conv/linear layers in one pullback backward")
        print("| model | batch | unflushed | flushed |\n|---|---|---|---|")
        for arch in args.archs:
            raw, flushed = subnormal_fraction(arch, args.device, batches[0], args.size)
            print(f"| {arch} | {batches[0]} | {raw:.2%} | {flushed:.2%} |", flush=True)
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
    print(f"\n# load after: {_uptime()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
