"""Excitation pullbacks: input gradients of ReLU networks with soft gates in the backward pass.

The core (this package's top level) needs only torch; the experiment pipeline lives in
``excitation_pullbacks.pipeline`` modules that import Hydra, Lightning and W&B.

Modules, each importing only those above it: ``gates`` (gate shapes), ``sites`` -> ``schedules`` (which gate
where) -> ``options`` (``GateOptions`` and the presets) and ``rules/`` (one module per family of surrogate rules
and the registry) -> ``canonizers`` (the lean BatchNorm) -> ``gating`` (the reversible ``excitation(model)``
context) -> ``checks``, ``state`` (the model left as it was), ``stopping`` (``should_stop``) -> ``pullback`` ->
``replay`` (pullbacks traced once and replayed), ``ascent``, ``path_kernel``, ``calibration`` -> ``explain``,
``attribution`` (Captum), ``baselines`` (Captum) -> ``metrics/``; ``models/`` (ImageNet wrapper, digits CNN,
checkpoints, class names) and ``images`` (image files -> inputs) stand apart; ``tracing`` (whether a graph is
being traced) sits below the rules. See docs/architecture.md.
"""

from .ascent import ascent
from .calibration import calibrate
from .gates import POOL_SHAPES, RELU_SHAPES, Gate
from .gating import Excitation, Report, UngatedActivationWarning, excitation
from .models import ImageNetInput, build_model
from .options import PRESETS, GateOptions, as_schedule, make_schedule, preset
from .path_kernel import path_kernel
from .pullback import Neuron, pullback
from .replay import ReplayedPullback
from .rules import Rule, register, soft_attention, soft_gelu, soft_max_pool2d, soft_relu, soft_silu
from .schedules import ByDepth, ByName, ByType, PerChannel, Schedule
from .sites import Site
from .variants import (
    VARIANTS,
    fusion_pullback,
    input_times,
    make_variant,
    pullback_ascent,
    smooth_pullback,
    soft_pullback,
)

__all__ = [
    "POOL_SHAPES",
    "PRESETS",
    "RELU_SHAPES",
    "VARIANTS",
    "ByDepth",
    "ByName",
    "ByType",
    "Excitation",
    "ExcitationPullback",
    "Gate",
    "GateOptions",
    "ImageNetInput",
    "Neuron",
    "PerChannel",
    "ReplayedPullback",
    "Report",
    "Rule",
    "Schedule",
    "Site",
    "UngatedActivationWarning",
    "as_schedule",
    "ascent",
    "build_model",
    "calibrate",
    "excitation",
    "fusion_pullback",
    "input_times",
    "make_schedule",
    "make_variant",
    "path_kernel",
    "preset",
    "pullback",
    "pullback_ascent",
    "register",
    "smooth_pullback",
    "soft_attention",
    "soft_gelu",
    "soft_max_pool2d",
    "soft_pullback",
    "soft_relu",
    "soft_silu",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``ExcitationPullback`` (Captum-style interface) is imported on first use: it needs Captum."""
    if name == "ExcitationPullback":
        from .attribution import ExcitationPullback

        return ExcitationPullback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
