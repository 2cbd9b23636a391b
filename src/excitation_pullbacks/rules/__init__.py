"""Surrogate rules, one module per family, and the registry the gating context dispatches through.

Families: ``activations`` (ReLU, SiLU, GELU), ``pool`` (max-pool; its CPU kernel op in ``pool_kernel``),
``batch_norm`` (the frozen BatchNorm pieces the ``LeanBatchNorm`` canonizer uses), ``layer_norm`` (LayerNorm,
GroupNorm), ``attention`` (fused and explicit attention). A new layer type is one module with a
:class:`~excitation_pullbacks.rules.base.Rule` and one :func:`register` call.
"""

from .activations import GELU, ReLU, SiLU, soft_gelu, soft_relu, soft_silu
from .attention import ExplicitAttention, FusedAttention, MultiheadAttention, soft_attention, soft_softmax
from .base import Call, Rule
from .layer_norm import GroupNorm, LayerNorm, frozen_group_norm, frozen_layer_norm
from .pool import MaxPool2d, PoolArgs, soft_max_pool2d
from .registry import register, rule_for, rules, unregister

__all__ = [
    "Call",
    "PoolArgs",
    "Rule",
    "frozen_group_norm",
    "frozen_layer_norm",
    "register",
    "rule_for",
    "rules",
    "soft_attention",
    "soft_gelu",
    "soft_max_pool2d",
    "soft_relu",
    "soft_silu",
    "soft_softmax",
    "unregister",
]

for _rule in (
    ReLU(),
    MaxPool2d(),
    SiLU(),
    GELU(),
    LayerNorm(),
    GroupNorm(),
    FusedAttention(),
    ExplicitAttention(),
    MultiheadAttention(),
):
    register(_rule)
