"""Excitation pullbacks: input gradients of ReLU networks with soft gates in the backward pass.

The core (this package's top level) needs only torch; the experiment pipeline lives in
``excitation_pullbacks.pipeline`` modules that import Hydra, Lightning and W&B.

Modules, each importing only those above it: ``gates`` (gate shapes, sites, schedules) -> ``surrogates``
(exact forward, soft backward) -> ``gating`` (the reversible ``excitation(model)`` context) -> ``checks``,
``state`` (the model left as it was), ``stopping`` (``should_stop``) -> ``pullback`` -> ``ascent``, ``kernel``,
``calibration`` -> ``explain``, ``attribution`` (Captum), ``baselines`` (Captum) -> ``metrics/``; ``models/``
(ImageNet wrapper, digits CNN, checkpoints) and ``images`` (image files -> inputs) stand apart.
"""

from .ascent import ascent
from .calibration import calibrate
from .gates import (
    POOL_SHAPES,
    RELU_SHAPES,
    ByDepth,
    ByName,
    ByType,
    Gate,
    PerChannel,
    Schedule,
    Site,
    as_schedule,
    make_schedule,
)
from .gating import Excitation, Report, UngatedActivationWarning, excitation
from .kernel import path_kernel
from .models import ImageNetInput, build_model
from .pullback import Neuron, pullback
from .surrogates import soft_gelu, soft_max_pool2d, soft_relu, soft_silu

__all__ = [
    "POOL_SHAPES",
    "RELU_SHAPES",
    "ByDepth",
    "ByName",
    "ByType",
    "Excitation",
    "ExcitationPullback",
    "Gate",
    "ImageNetInput",
    "Neuron",
    "PerChannel",
    "Report",
    "Schedule",
    "Site",
    "UngatedActivationWarning",
    "as_schedule",
    "ascent",
    "build_model",
    "calibrate",
    "excitation",
    "make_schedule",
    "path_kernel",
    "pullback",
    "soft_gelu",
    "soft_max_pool2d",
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
