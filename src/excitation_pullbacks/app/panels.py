"""The explorer's computations, as plain functions of (model, image, target, settings): gradients,
top-k predictions, temperature strips, ascent trajectories, the call-site report, and their rendering to
PIL images. The page only wires these to widgets; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from excitation_pullbacks import PRESETS, GateOptions, Neuron, ascent, excitation

from .methods import MethodSettings, method_map, method_title
from .replays import explorer_pullback

__all__ = [
    "DISPLAY_SIZE",
    "AscentSettings",
    "Cancelled",
    "call_site_report",
    "gradients",
    "render_image",
    "render_map",
    "render_strip",
    "step_views",
    "temperature_strip",
    "top_k",
    "trajectories",
]

#: Panels are upscaled (nearest neighbour) to at least this side length, so 32-pixel digits stay legible.
DISPLAY_SIZE = 224


class Cancelled(RuntimeError):
    """The user stopped the computation."""


#: The vanilla gradient: hard gates everywhere (bit for bit the autograd input gradient).
VANILLA = PRESETS["vanilla"]


@dataclass(frozen=True)
class AscentSettings:
    """Projected gradient ascent: steps, L2 step size alpha, L2 radius eps (the paper: 10, 20, 100)."""

    steps: int = 10
    step_size: float = 20.0
    eps: float = 100.0


def gradients(model: nn.Module, x: Tensor, target: int | Neuron, gate: GateOptions) -> dict[str, Tensor]:
    """x (1, 3, H, W) in [-1, 1] -> {"vanilla": (1, 3, H, W) input gradient, "excitation": (1, 3, H, W)
    pullback with ``gate``} of the class logit or hidden neuron ``target`` (replayed once the page keeps
    using a gate: :mod:`.replays`)."""
    return {
        "vanilla": explorer_pullback(model, x, target, VANILLA),
        "excitation": explorer_pullback(model, x, target, gate),
    }


@torch.no_grad()
def top_k(model: nn.Module, x: Tensor, classes: Sequence[str], k: int = 5) -> dict[str, float]:
    """x (1, 3, H, W) -> {class name: softmax probability} of the k most probable classes (gr.Label's format)."""
    probs = model(x).softmax(1)[0]
    values, indices = probs.topk(min(k, probs.numel()))
    return {f"{classes[i]} ({i})": float(v) for v, i in zip(values.tolist(), indices.tolist())}


def temperature_strip(
    model: nn.Module, x: Tensor, target: int | Neuron, gate: GateOptions, temperatures: Sequence[float]
) -> Tensor:
    """The pullback at each temperature: (K, 3, H, W) for K temperatures (T = 0: the vanilla gradient)."""
    rows = [
        explorer_pullback(model, x, target, VANILLA if t == 0 else gate.replace(temperature=float(t)))[0]
        for t in temperatures
    ]
    return torch.stack(rows)


def trajectories(
    model: nn.Module,
    x: Tensor,
    target: int,
    gate: GateOptions,
    settings: AscentSettings,
    tick: Callable[[str], None] | None = None,
) -> dict[str, Tensor]:
    """Projected gradient ascent of class ``target`` from x (1, 3, H, W), along excitation pullbacks and
    along vanilla gradients: {"excitation": (steps + 1, 3, H, W), "vanilla": (steps + 1, 3, H, W)}, row 0
    the original. ``tick(what)`` is called before every step (progress; it may raise :class:`Cancelled`).
    The step direction goes through ``ascent``'s ``direction`` hook so that ticks can run between steps;
    it is ``pullback`` with the same settings, i.e. what ``ascent`` computes itself."""
    out = {}
    for kind, g in (("excitation", gate), ("vanilla", VANILLA)):

        def direction(xs: Tensor, t: Tensor, g=g, kind=kind) -> Tensor:
            if tick is not None:
                tick(kind)
            return explorer_pullback(model, xs, t, g)

        _, traj = ascent(
            model,
            x,
            int(target),
            steps=int(settings.steps),
            step_size=float(settings.step_size),
            eps=float(settings.eps),
            direction=direction,
            return_trajectory=True,
        )
        out[kind] = traj[:, 0]
    return out


def call_site_report(model: nn.Module, x: Tensor, gate: GateOptions) -> str:
    """The gated call sites of one forward pass of x under ``gate``: ``str(Report)`` (every kind: ReLU,
    max-pool, SiLU, GELU, norm, attention; a line per site), its first line without the kinds the model
    never called (a transformer's "0 ReLU at 0 sites")."""
    with torch.no_grad(), excitation(model, gate) as report:
        model(x)
    head, *sites = str(report).split("\n")
    prefix, _, rest = head.partition(": ")
    counts, _, passes = rest.rpartition(" (")
    kept = [part for part in counts.split(", ") if not part.startswith("0 ")] or [counts]
    return "\n".join([f"{prefix}: {', '.join(kept)} ({passes}", *sites])


def _upscale(im: Image.Image, size: int) -> Image.Image:
    scale = max(1, -(-size // max(im.size)))
    return im if scale == 1 else im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def render_map(t: Tensor, size: int = DISPLAY_SIZE) -> Image.Image:
    """A gradient-like map (3, H, W) or (1, 3, H, W) -> RGB image, min-max scaled per map (as the paper's
    ``make_grid(normalize=True, scale_each=True)`` cells), upscaled to at least ``size``."""
    t = t.detach().float().cpu().reshape(-1, *t.shape[-2:])
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    return _to_pil(t, size)


def render_image(x: Tensor, size: int = DISPLAY_SIZE) -> Image.Image:
    """An image (3, H, W) or (1, 3, H, W) in [-1, 1] -> RGB image (no rescaling), upscaled to at least ``size``."""
    t = x.detach().float().cpu().reshape(-1, *x.shape[-2:])
    return _to_pil(((t + 1) / 2).clamp(0, 1), size)


def _to_pil(t: Tensor, size: int) -> Image.Image:
    a = (t * 255).round().to(torch.uint8)
    a = a.expand(3, -1, -1) if a.shape[0] == 1 else a
    return _upscale(Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB"), size)


def render_strip(maps: Tensor, temperatures: Sequence[float], size: int = 160) -> Image.Image:
    """Maps (K, 3, H, W) -> one row of K min-max scaled panels, each titled ``T = ...``."""
    panels = [render_map(m, size).resize((size, size), Image.NEAREST) for m in maps]
    pad, title = 4, 18
    strip = Image.new("RGB", (len(panels) * (size + pad) - pad, size + title), "white")
    draw = ImageDraw.Draw(strip)
    for i, (p, t) in enumerate(zip(panels, temperatures)):
        x0 = i * (size + pad)
        strip.paste(p, (x0, title))
        draw.text((x0 + 4, 3), "vanilla (T = 0)" if t == 0 else f"T = {t:g}", fill="black")
    return strip


def step_views(trajectory: Tensor, step: int, size: int = DISPLAY_SIZE) -> tuple[Image.Image, Image.Image]:
    """Trajectory (S + 1, 3, H, W) -> (the image at ``step``, its difference from step 0, min-max scaled)."""
    step = max(0, min(int(step), trajectory.shape[0] - 1))
    return render_image(trajectory[step], size), render_map(trajectory[step] - trajectory[0], size)


@dataclass
class Exploration:
    """Everything one run of the explorer computes for one image (CPU tensors).

    x: (1, 3, H, W) in [-1, 1]; vanilla, excitation: (1, 3, H, W); strip: (K, 3, H, W) at ``temperatures``;
    trajectories: {"excitation", "vanilla"} -> (steps + 1, 3, H, W), empty for a hidden-neuron target;
    before / after: top-k {name: probability} of x and of each ascent's final image; report: call sites;
    method: (1, 3, H, W) the Method panel's variant map (None: not asked for), method_name: its title.
    """

    x: Tensor
    vanilla: Tensor
    excitation: Tensor
    temperatures: tuple[float, ...]
    strip: Tensor
    trajectories: dict[str, Tensor]
    before: dict[str, float]
    after: dict[str, dict[str, float]]
    report: str
    method: Tensor | None = None
    method_name: str = ""


def explore(
    model: nn.Module,
    x: Tensor,
    target: int | Neuron,
    classes: Sequence[str],
    gate: GateOptions,
    settings: AscentSettings,
    temperatures: Sequence[float],
    tick: Callable[[str], None] | None = None,
    method: MethodSettings | None = None,
    should_stop: Callable[[], None] | None = None,
) -> Exploration:
    """All panels for x (1, 3, H, W) on the model's device: gradients, strip, ascent (class targets only),
    top-5 before and after, call sites, and the ``method``'s map (:func:`.methods.method_map`; None: none).
    ``tick(what)`` runs between the pieces of work (progress, Stop); ``should_stop()`` before each forward
    pass of the method (it may raise :class:`Cancelled`)."""

    def note(what: str) -> None:
        if tick is not None:
            tick(what)

    note("gradients")
    grads = gradients(model, x, target, gate)
    note("temperature strip")
    strip = temperature_strip(model, x, target, gate, temperatures)
    trajs, after = {}, {}
    if not isinstance(target, Neuron):
        trajs = trajectories(model, x, target, gate, settings, tick)
        after = {kind: top_k(model, t[-1:], classes) for kind, t in trajs.items()}
    mapped = None
    if method is not None:
        note("method")
        mapped = method_map(model, x, target, method, gate, should_stop).detach().cpu()
    note("call sites")
    return Exploration(
        x.cpu(),
        grads["vanilla"].cpu(),
        grads["excitation"].cpu(),
        tuple(temperatures),
        strip.cpu(),
        {k: v.cpu() for k, v in trajs.items()},
        top_k(model, x, classes),
        after,
        call_site_report(model, x, gate),
        mapped,
        method_title(method) if method is not None else "",
    )
