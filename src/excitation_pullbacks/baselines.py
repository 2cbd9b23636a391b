"""Baseline attribution methods, behind one interface shared with excitation pullbacks.

Each method is an *explain* function (:data:`~excitation_pullbacks.explain.Explain`); the same functions
feed the figure grids, the ascent loop (``ascent(direction=as_direction(...))``) and the metrics in
:mod:`excitation_pullbacks.metrics`. Methods live in a registry: a name maps to a factory
``factory(options, schedule) -> explain`` (:data:`REGISTRY`, :func:`register_method`), so another method
(a pullback variant, say) is one more entry. Importing this module needs Captum (a dependency of the package).

Captum's DeepLift and the guided-backprop half of GuidedGradCam act on ``nn.ReLU`` modules: functional ReLU
calls (DenseNet's last ``F.relu``) are left as plain ReLUs. DeepLift here supports models whose ReLU modules
are each called once per forward pass, and torchvision ResNets (a ReLU module called several times, as in
``BasicBlock`` / ``Bottleneck``, is split into one module per call on a copy of the model).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import torch
from captum.attr import (
    DeepLift,
    GradientShap,
    GuidedBackprop,
    GuidedGradCam,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from torch import Tensor, nn

from . import variants
from .ascent import ascent
from .attribution import ExcitationPullback
from .explain import Explain
from .options import resolve_schedule
from .pullback import frozen_parameters
from .schedules import Schedule
from .state import preserved_model

__all__ = [
    "BASELINES",
    "METHODS",
    "REGISTRY",
    "BaselineOptions",
    "Explain",
    "as_direction",
    "explainer",
    "gradcam_layer",
    "register_method",
]


@dataclass(frozen=True)
class BaselineOptions:
    """Options of the baseline methods (the keyword arguments of :func:`explainer`).

    smoothgrad_samples, smoothgrad_noise: SmoothGrad's noisy copies and noise std as a fraction of
        ``value_range`` (the published SmoothGrad: 50 copies, std 0.15 on [-1, 1] images, i.e. 0.075).
    ig_steps, ig_baseline: integrated gradients' Gauss-Legendre points and constant baseline image.
    gradient_shap_samples, gradient_shap_stdevs, gradient_shap_baseline: Captum GradientShap's samples per
        image, input noise std and constant baseline image (published: Captum's 5 and 0.0, baseline 0).
    deeplift_baseline: DeepLift's constant reference image (published: 0).
    gradcam_layer: the module name Grad-CAM and GuidedGradCam read (None: :func:`gradcam_layer`);
        gradcam_interpolate: how the layer map is upsampled to the image (Captum's GuidedGradCam uses
        ``nearest``); gradcam_relu: Grad-CAM keeps only positive evidence (the original definition).
    fusiongrad_models, fusiongrad_samples, fusiongrad_weight_noise, fusiongrad_noise, fusiongrad_noise_type:
        FusionGrad (Bykov et al. 2022) averages the vanilla gradient over ``models`` copies of the model with
        noisy weights times ``samples`` noisy inputs; every parameter (not the buffers) is multiplied by
        N(1, weight_noise^2) draws (``multiplicative``, as published) or gets N(0, weight_noise^2) draws
        added (``additive``); input noise std ``fusiongrad_noise * value_range``. Published: 10 x 10, 0.1,
        0.075 (std 0.15 on [-1, 1] images).
    gradient_ascent_steps, gradient_ascent_step_size, gradient_ascent_clip: GradientAscent, the image change
        after that many steps of the vanilla gradient ascent (step L2 norm ``step_size``, no L2 ball); clip:
        the final image is clamped to [-1, 1] (the published "ClipLast" variant; default: no clamp).
    pullback_ascent_steps, pullback_ascent_step_size: PullbackAscent's K and alpha (published: 5 and 20).
    value_range: the width of the images' value range (2 for [-1, 1]).
    batch_size: images per forward pass for SmoothGrad / IG / FusionGrad samples (None: all at once).
    """

    smoothgrad_samples: int = 25
    smoothgrad_noise: float = 0.15
    ig_steps: int = 32
    ig_baseline: float = -1.0
    gradient_shap_samples: int = 5
    gradient_shap_stdevs: float = 0.0
    gradient_shap_baseline: float = 0.0
    deeplift_baseline: float = 0.0
    gradcam_layer: str | None = None
    gradcam_interpolate: str = "bilinear"
    gradcam_relu: bool = True
    fusiongrad_models: int = 10
    fusiongrad_samples: int = 10
    fusiongrad_weight_noise: float = 0.1
    fusiongrad_noise: float = 0.075
    fusiongrad_noise_type: str = "multiplicative"
    gradient_ascent_steps: int = 5
    gradient_ascent_step_size: float = 20.0
    gradient_ascent_clip: bool = False
    pullback_ascent_steps: int = 5
    pullback_ascent_step_size: float = 20.0
    value_range: float = 2.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "smoothgrad needs samples >= 1 and noise >= 0": self.smoothgrad_samples >= 1 and self.smoothgrad_noise >= 0,
            "integrated_gradients needs ig_steps >= 1": self.ig_steps >= 1,
            "gradient_shap needs samples >= 1 and stdevs >= 0": self.gradient_shap_samples >= 1
            and self.gradient_shap_stdevs >= 0,
            "fusiongrad needs models >= 1, samples >= 1 and noise >= 0": self.fusiongrad_models >= 1
            and self.fusiongrad_samples >= 1
            and self.fusiongrad_weight_noise >= 0
            and self.fusiongrad_noise >= 0,
            "fusiongrad_noise_type must be multiplicative or additive": self.fusiongrad_noise_type
            in ("multiplicative", "additive"),
            "gradient_ascent needs steps >= 1 and step_size >= 0": self.gradient_ascent_steps >= 1
            and self.gradient_ascent_step_size >= 0,
            "pullback_ascent needs steps >= 0 and step_size >= 0": self.pullback_ascent_steps >= 0
            and self.pullback_ascent_step_size >= 0,
            "gradcam_interpolate must be nearest, bilinear or bicubic": self.gradcam_interpolate
            in ("nearest", "bilinear", "bicubic"),
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"{message}; got {self}")


#: A method's factory: (options, gate schedule) -> explain function.
Factory = Callable[[BaselineOptions, Schedule], Explain]


def _vanilla(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return Saliency(model).attribute(x, target=target, abs=False)


def _smoothgrad(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    return NoiseTunnel(Saliency(model)).attribute(
        x,
        nt_type="smoothgrad",
        nt_samples=o.smoothgrad_samples,
        nt_samples_batch_size=o.batch_size,
        stdevs=o.smoothgrad_noise * o.value_range,
        target=target,
        abs=False,
    )


def _guided_backprop(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return GuidedBackprop(model).attribute(x, target=target)


def _integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    return IntegratedGradients(model).attribute(
        x, baselines=o.ig_baseline, target=target, n_steps=o.ig_steps, internal_batch_size=o.batch_size
    )


def _gradient_shap(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    baselines = torch.full_like(x[:1], o.gradient_shap_baseline)
    return GradientShap(model).attribute(
        x, baselines=baselines, n_samples=o.gradient_shap_samples, stdevs=o.gradient_shap_stdevs, target=target
    )


class _CallSplit(nn.Module):
    """Stands for a ReLU module called ``calls`` times per forward pass: call k goes to its own ``nn.ReLU``
    (not in place), so that every ReLU module runs once, as Captum's DeepLift needs."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(nn.ReLU() for _ in range(calls))
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.parts[self.count % len(self.parts)](x)
        self.count += 1
        return out


def _untied_relus(model: nn.Module, x: Tensor) -> nn.Module:
    """A copy of ``model`` where each ``nn.ReLU`` module called more than once per forward pass (on x[:1]) is
    a :class:`_CallSplit`; its counters restart with every forward pass of the copy."""
    calls: dict[str, int] = {}
    relus = {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, m in relus.items()
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    shared = {name: k for name, k in calls.items() if k > 1}
    if not shared:
        return model
    work = copy.deepcopy(model)
    splits = []
    for name, k in shared.items():
        parent_name, _, attr = name.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        split = _CallSplit(k)
        setattr(parent, attr, split)
        splits.append(split)

    def restart(*_):
        for s in splits:
            s.count = 0

    work.register_forward_pre_hook(restart)
    return work


def _deeplift(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    return DeepLift(_untied_relus(model, x)).attribute(x, baselines=o.deeplift_baseline, target=target)


def gradcam_layer(model: nn.Module, x: Tensor) -> str:
    """The module Grad-CAM reads by default: the last module, in the order modules finish during a forward
    pass on x[:1], that holds parameters and outputs a spatial (N, C, h, w) map with h * w > 1 - the last
    convolutional block (``layer4`` of a ResNet, ``features`` of VGG, DenseNet and the digits CNN).
    x: (N, C, H, W). Raises ValueError when there is none."""
    order: list[str] = []
    candidates = {
        name: m for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=True))
    }

    def hook(name: str):
        def record(mod, args, out) -> None:
            if isinstance(out, Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
                order.append(name)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in candidates.items()]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("Grad-CAM needs a layer with a spatial output; the model has none (set gradcam_layer)")
    return order[-1]


def _layer(model: nn.Module, x: Tensor, o: BaselineOptions) -> nn.Module:
    name = o.gradcam_layer or gradcam_layer(model, x)
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"gradcam_layer {name!r} is not a module of the model") from None


def _gradcam(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    cam = LayerGradCam(model, _layer(model, x, o)).attribute(x, target=target, relu_attributions=o.gradcam_relu)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode=o.gradcam_interpolate)
    return cam.expand_as(x)


def _guided_gradcam(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    return GuidedGradCam(model, _layer(model, x, o)).attribute(x, target=target, interpolate_mode=o.gradcam_interpolate)


def _fusiongrad(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    work = copy.deepcopy(model)
    params = [p for p in work.parameters()]
    originals = [p.detach().clone() for p in params]
    m = o.fusiongrad_samples
    per = max(1, (o.batch_size or m * x.shape[0]) // x.shape[0])
    total = torch.zeros_like(x)
    saliency = Saliency(work)
    for _ in range(o.fusiongrad_models):
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                draw = o.fusiongrad_weight_noise * torch.randn_like(p0)
                p.copy_(p0 * (1.0 + draw) if o.fusiongrad_noise_type == "multiplicative" else p0 + draw)
        for s0 in range(0, m, per):
            k = min(m, s0 + per) - s0
            xs = x.detach().repeat(k, 1, 1, 1)
            xs = xs + o.fusiongrad_noise * o.value_range * torch.randn_like(xs)
            g = saliency.attribute(xs.requires_grad_(True), target=target.repeat(k), abs=False)
            total += g.view(k, *x.shape).sum(0)
    return total / (o.fusiongrad_models * m)


def _gradient_ascent(model: nn.Module, x: Tensor, target: Tensor, *, o: BaselineOptions) -> Tensor:
    x0 = x.detach()
    end = ascent(
        model,
        x0,
        target,
        vanilla=True,
        steps=o.gradient_ascent_steps,
        step_size=o.gradient_ascent_step_size,
        eps=math.inf,
        bounds=None,
    )
    if o.gradient_ascent_clip:
        end = end.clamp(-1.0, 1.0)
    return end - x0


def _excitation(model: nn.Module, x: Tensor, target: Tensor, *, schedule: Schedule) -> Tensor:
    return ExcitationPullback(model, schedule).attribute(x, target=target)


#: Method name -> factory(options, schedule) -> explain function.
REGISTRY: dict[str, Factory] = {
    "vanilla": lambda o, s: _vanilla,
    "smoothgrad": lambda o, s: partial(_smoothgrad, o=o),
    "guided_backprop": lambda o, s: _guided_backprop,
    "integrated_gradients": lambda o, s: partial(_integrated_gradients, o=o),
    "gradient_shap": lambda o, s: partial(_gradient_shap, o=o),
    "deeplift": lambda o, s: partial(_deeplift, o=o),
    "gradcam": lambda o, s: partial(_gradcam, o=o),
    "guided_gradcam": lambda o, s: partial(_guided_gradcam, o=o),
    "fusiongrad": lambda o, s: partial(_fusiongrad, o=o),
    "gradient_ascent": lambda o, s: partial(_gradient_ascent, o=o),
    "excitation": lambda o, s: partial(_excitation, schedule=s),
    # the pullback's variants (excitation_pullbacks.variants) at the run's gates, the author's settings
    "pullback_ascent": lambda o, s: variants.pullback_ascent(
        s, steps=o.pullback_ascent_steps, step_size=o.pullback_ascent_step_size
    ),
    "smooth_pullback": lambda o, s: variants.smooth_pullback(s),
    "fusion_pullback": lambda o, s: variants.fusion_pullback(s),
}

#: Baselines (methods that ignore the gates), and all methods at import time (:data:`REGISTRY` may grow).
_GATED = ("excitation", "pullback_ascent", "smooth_pullback", "fusion_pullback")
BASELINES = tuple(name for name in REGISTRY if name not in _GATED)
METHODS = BASELINES + _GATED

_OPTIONS = tuple(f.name for f in fields(BaselineOptions))


def register_method(name: str, factory: Factory) -> None:
    """Add a method: ``factory(options, schedule)`` returns the explain function ``(model, x, target) ->
    (N, C, H, W)`` for :class:`BaselineOptions` ``options`` and the gate ``schedule`` (a pullback variant
    reads the schedule, a baseline ignores it). :func:`explainer` then accepts ``name``."""
    if not name or not callable(factory):
        raise ValueError("register_method needs a name and a callable factory")
    REGISTRY[name] = factory


def explainer(method: str, schedule: Schedule | float | None = None, **kwargs) -> Explain:
    """The explain function of ``method`` (a name in :data:`REGISTRY`).

    vanilla: Captum ``Saliency(abs=False)``, the input gradient.
    smoothgrad: ``NoiseTunnel(Saliency)``, mean gradient over noisy copies (Smilkov et al. suggest 10-20%
        of the input range).
    guided_backprop: Captum ``GuidedBackprop`` (only ``nn.ReLU`` modules are modified, as Captum does).
    integrated_gradients: Captum ``IntegratedGradients`` from a constant image (-1: black in [-1, 1]).
    gradient_shap: Captum ``GradientShap`` from a constant image (expected gradients along random paths).
    deeplift: Captum ``DeepLift`` (Rescale rule) from a constant reference image.
    gradcam: Captum ``LayerGradCam`` at the last convolutional block (:func:`gradcam_layer`), upsampled to the
        image and repeated over its channels. guided_gradcam: Captum ``GuidedGradCam`` at the same layer.
    fusiongrad: gradients averaged over weight and input noise. gradient_ascent: the image change after
        vanilla gradient ascent steps (core :func:`~excitation_pullbacks.ascent.ascent`, ``vanilla=True``).
    excitation: :class:`~excitation_pullbacks.attribution.ExcitationPullback` with the gates.
    kwargs: :class:`BaselineOptions` fields (see there); every other keyword is a gate keyword
        (:func:`~excitation_pullbacks.gates.as_schedule`, validated for every method, used by the gated ones).
    The model is left as it was (parameters, buffers, flags); Captum's notice about ReLU hooks is silenced.
    """
    options = BaselineOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS})
    sched = resolve_schedule(schedule, kwargs)
    if method not in REGISTRY:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(REGISTRY)}")
    fn = REGISTRY[method](options, sched)

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        # no weight gradients; buffers (BatchNorm statistics in train mode) and flags restored
        with preserved_model(model), frozen_parameters(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # Captum's notice
            warnings.filterwarnings("ignore", message=".*backward hooks.*")
            return fn(model, x.detach().requires_grad_(True), target).detach()

    explain.__name__ = method
    return explain


def as_direction(model: nn.Module, explain: Explain) -> Callable[[Tensor, Tensor], Tensor]:
    """``explain`` as an ascent step direction: ``direction(x, t) -> (M, C, H, W)`` for ``ascent(direction=...)``."""
    return lambda x, t: explain(model, x, t)
