"""Typed schemas of the config groups whose values the code reads by type (Hydra structured configs).

Each schema is stored in Hydra's ConfigStore as the option ``schema`` of its group; the YAML options of the
group (``conf/gate/*.yaml``, ...) list it first in their defaults and state only what differs, so a wrong type
or an unknown choice (``gate.temperature=warm``, ``gate.kind=per_pixel``) fails when the config is composed,
before anything runs. The packaged configs live in ``excitation_pullbacks/conf`` (:data:`CONFIG_DIR`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from excitation_pullbacks.gates import NORM_SHAPES, RELU_SHAPES
from excitation_pullbacks.options import COMPAT
from excitation_pullbacks.variants import VARIANTS

from .ablation_settings import ablation_value

__all__ = [
    "CONFIG_DIR",
    "AscentConfig",
    "BaselinesConfig",
    "Compat",
    "GateConfig",
    "GateKind",
    "GateShape",
    "LoggerConfig",
    "LoggerMode",
    "NormShape",
    "TrainerConfig",
    "VariantName",
    "VariantsConfig",
    "WeightNoise",
    "job_folder",
    "register_schemas",
]

#: The packaged config directory (``conf/`` inside the installed package).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class GateKind(str, Enum):
    """How gate temperatures are set: one T per run setting, per channel from calibration, or by depth."""

    uniform = "uniform"
    calibrated = "calibrated"
    by_depth = "by_depth"


#: The ReLU gate shape: the core's :data:`~excitation_pullbacks.gates.RELU_SHAPES`, one member each.
GateShape = Enum("GateShape", [(s, s) for s in RELU_SHAPES], type=str)
#: Normalisation sites: the core's :data:`~excitation_pullbacks.gates.NORM_SHAPES`.
NormShape = Enum("NormShape", [(s, s) for s in NORM_SHAPES], type=str)
#: ``default``, or the quirks of one published code (:data:`~excitation_pullbacks.options.COMPAT`).
Compat = Enum("Compat", [(s, s) for s in COMPAT], type=str)


#: A pullback variant: the core's :data:`~excitation_pullbacks.variants.VARIANTS`, one member each.
VariantName = Enum("VariantName", [(v, v) for v in VARIANTS], type=str)


class WeightNoise(str, Enum):
    """How FusionPullback perturbs the weights."""

    multiplicative = "multiplicative"
    additive = "additive"


class LoggerMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class GateConfig:
    """The backward gate of a run (``gate=``). ``kind`` says which of the fields below apply:

    uniform: Gate(shape, T) at every ReLU, T from ``temperatures`` (figures and tables: one row per T;
        ``temperature`` is the row the figures draw and the objective reads).
    calibrated: per-channel T_c = calibration_scale * std_c(z) from ``calibration`` (a PerChannel file) or
        calibrated on ``calibration_batches`` batches of the data; ``temperature`` for sites the file lacks.
    by_depth: the ReLU calls split into len(depth_temperatures) equal groups by depth, group g at
        depth_temperatures[g]; max-pool (and SiLU/GELU) sites follow each row's T.
    The gate fields are those of the core's :class:`~excitation_pullbacks.options.GateOptions` (``shape`` is
    its ``gate``; a test checks that they stay the same): pool_temperature (null: follow the ReLU gate),
    pool_detach, smooth_temperature / silu_temperature / gelu_temperature (SiLU and GELU sites), norm
    (LayerNorm / GroupNorm: hard | frozen), attention_temperature (null: exact attention) and
    attention_detach, compat (``author``: the ReLU paper's code; ``semantic_author``: the deep-network
    paper's code). The presets ``gate=author``, ``gate=semantic``, ``gate=semantic_author`` set them.
    """

    kind: GateKind = GateKind.uniform
    shape: GateShape = GateShape.sigmoid
    temperature: float = 0.3
    pool_temperature: Optional[float] = None
    pool_detach: Optional[bool] = None
    smooth_temperature: Optional[float] = None
    smooth_gate: GateShape = GateShape.own
    silu_temperature: Optional[float] = None
    gelu_temperature: Optional[float] = None
    norm: NormShape = NormShape.hard
    attention_temperature: Optional[float] = None
    attention_detach: bool = False
    compat: Compat = Compat.default
    calibration: Optional[str] = None
    calibration_scale: float = 0.3
    calibration_batches: int = 4
    depth_temperatures: Optional[List[float]] = None


@dataclass
class AscentConfig:
    """Projected gradient ascent (``ascent=``): steps of ``step_size`` along the normalised pullback, L2 radius
    ``eps`` around the image; Fig 1 reads step ``fig1_steps`` of the same run."""

    steps: int = 10
    step_size: float = 20.0
    eps: float = 100.0
    fig1_steps: int = 5


@dataclass
class BaselinesConfig:
    """Baseline attribution methods (``baselines=``): the ``baselines`` figure's panels and the options every
    baseline explainer takes (figures, evaluate, published_table); each field is the keyword of the same name
    of ``excitation_pullbacks.baselines.BaselineOptions``, which documents it."""

    methods: List[str] = field(
        default_factory=lambda: ["vanilla", "smoothgrad", "guided_backprop", "integrated_gradients"]
    )
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15  # noise std as a fraction of the [-1, 1] range
    ig_steps: int = 16
    ig_baseline: float = -1.0  # integrated gradients from the black image
    gradient_shap_samples: int = 5  # Captum's default, as published
    gradient_shap_stdevs: float = 0.0
    gradient_shap_baseline: float = 0.0  # the grey image, as published
    deeplift_baseline: float = 0.0  # the grey image, as published
    gradcam_layer: Optional[str] = None  # module name (null: the last convolutional block)
    gradcam_interpolate: str = "bilinear"  # nearest | bilinear | bicubic
    gradcam_relu: bool = True
    fusiongrad_models: int = 10  # noisy-weight copies of the model
    fusiongrad_samples: int = 10  # noisy inputs per copy
    fusiongrad_weight_noise: float = 0.1  # weights times N(1, 0.1^2)
    fusiongrad_noise: float = 0.075  # input noise std as a fraction of the range (0.15 on [-1, 1])
    fusiongrad_noise_type: str = "multiplicative"  # multiplicative | additive
    gradient_ascent_steps: int = 5
    gradient_ascent_step_size: float = 20.0
    gradient_ascent_clip: bool = False  # clamp the final image to [-1, 1]
    pullback_ascent_steps: int = 5  # PullbackAscent's K, as published
    pullback_ascent_step_size: float = 20.0  # PullbackAscent's alpha, as published
    batch_size: Optional[int] = None  # SmoothGrad / IG / FusionGrad samples per forward (null: all)


@dataclass
class VariantsConfig:
    """Pullback variants (``variants=``) that ``figures=[variants]`` draws beside the excitation pullback, at
    the run's gate setting at ``gate.temperature``; their maps go to tensors.pt (``variants``) and their map
    structure to metrics_table.csv. ``methods``: any of :data:`~excitation_pullbacks.variants.VARIANTS`;
    times_input: draw x * map (the input x map) instead of each map. The other fields are the keywords of the
    factories in ``excitation_pullbacks.variants``, which document them: ascent_* of ``pullback_ascent``
    (steps K, step_size alpha, eps, clip), smooth_* of ``smooth_pullback``, fusion_* of ``fusion_pullback``;
    seed, draws_per_pass and batch_size of both noisy variants."""

    methods: List[VariantName] = field(default_factory=list)
    times_input: bool = False
    ascent_steps: int = 5
    ascent_step_size: float = 20.0
    ascent_eps: Optional[float] = None  # L2 radius around the image (null: none)
    ascent_clip: bool = True  # clamp the final image to [-1, 1]
    smooth_samples: int = 50
    smooth_noise: float = 0.15  # noise std in input units ([-1, 1] images)
    fusion_weight_samples: int = 10
    fusion_input_samples: int = 10
    fusion_weight_noise: float = 0.1
    fusion_weight_noise_type: WeightNoise = WeightNoise.multiplicative
    fusion_noise: float = 0.15
    seed: Optional[int] = 0  # the noise draws (null: torch's global random state)
    draws_per_pass: int = 1  # noisy copies of the batch per pullback call
    batch_size: Optional[int] = None  # images per forward pass within a call (null: all)


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` placement (``trainer=``)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"


@dataclass
class LoggerConfig:
    """Loggers (``logger=``): W&B (offline by default) and a CSV logger beside it."""

    wandb: bool = True
    csv: bool = True
    project: str = "excitation-pullbacks"
    group: Optional[str] = None  # W&B group (null: the experiment name, so a multirun's jobs are grouped)
    mode: LoggerMode = LoggerMode.offline
    tags: List[str] = field(default_factory=list)  # added to the run's tags (task, model, gate, data)
    notes: Optional[str] = None  # the run's notes (null: one sentence saying what the run computes)


SCHEMAS = {
    "gate": GateConfig,
    "ascent": AscentConfig,
    "baselines": BaselinesConfig,
    "variants": VariantsConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


#: Job folder names: values longer than JOB_VALUE_MAX are abbreviated, the whole name kept to JOB_NAME_MAX (file
#: systems allow 255 bytes).
JOB_VALUE_MAX, JOB_NAME_MAX = 32, 200


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def job_folder(overrides, exclude=()) -> str:
    """A multirun job's folder name from its command-line overrides (Hydra's ``overrides.task``): ``k=v`` joined
    by commas, sorted, without the ``exclude`` keys; one level whatever the values hold. A path value becomes
    its last component plus a digest of the whole (``data.root=photos~1a2b3c``), a long value its start plus
    a digest, so distinct values keep distinct folders; the full overrides stay in the job's config."""
    skip = {str(k) for k in exclude or ()}
    parts = []
    for item in sorted(str(o) for o in overrides or ()):
        key, sep, value = item.partition("=")
        if key.lstrip("+~") in skip:
            continue
        if "/" in value or "\\" in value:
            tail = [p for p in value.replace("\\", "/").split("/") if p]
            value = f"{tail[-1] if tail else 'root'}~{_digest(value)}"
        elif len(value) > JOB_VALUE_MAX:
            value = f"{value[: JOB_VALUE_MAX - 8]}~{_digest(value)}"
        parts.append(f"{key}{sep}{value}".replace(" ", "_"))
    name = ",".join(parts) or "default"
    if len(name) > JOB_NAME_MAX:
        name = f"{name[: JOB_NAME_MAX - 8]}~{_digest(name)}"
    return name


def register_schemas() -> None:
    """Store every schema as ``<group>/schema`` in Hydra's ConfigStore and register the ``job_folder`` and
    ``ablation`` resolvers (idempotent)."""
    store = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        store.store(group=group, name="schema", node=node)
    OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)
    OmegaConf.register_new_resolver("ablation", ablation_value, replace=True)


register_schemas()
