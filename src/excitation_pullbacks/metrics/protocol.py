"""The metric settings of the published comparison of attribution methods (Satkiewicz, "Pulling Back the
Curtain on Deep Networks", public code 314-Foundation/SemanticPullbacks, Quantus 0.6), as keyword arguments of
this package's metric functions.

The published settings are for 224 x 224 images in [-1, 1]; :meth:`MetricProtocol.scaled` gives the same
protocol for another image size (patch sizes scaled with the side, feature steps with the area, so every
metric perturbs the same fractions of the image in the same number of steps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

__all__ = ["METRIC_NAMES", "PUBLISHED", "MetricProtocol"]

#: The six Quantus metrics of the published table, in its column order.
METRIC_NAMES = (
    "infidelity",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "monotonicity_correlation",
    "max_sensitivity",
    "random_logit",
)


def _frozen(**kwargs: Any):
    return field(default_factory=lambda: MappingProxyType(dict(kwargs)))


@dataclass(frozen=True)
class MetricProtocol:
    """Keyword arguments per metric; the defaults are the published settings at ``size`` = 224.

    infidelity: Quantus ``Infidelity`` subclassed for optimal scaling; U(-1, 1) patches of 112 and 56 px,
        5 repetitions. faithfulness_correlation: subclassed to perturb every 56 px patch (not random
        subsets) with 0; |maps|. faithfulness_estimate: 48 steps of 12544 // 4 = 3136 features, baseline 0,
        |maps|. monotonicity_correlation: 48 steps, 10 U(-1, 1) draws each, |maps|, eps 1e-12.
        max_sensitivity: 10 draws of U(-0.02, 0.02) noise. random_logit: seed 42, Pearson correlation.
    focus: on 2 x 2 mosaics of 112 px tiles, relevance = input x attribution (no absolute value, no
        normalisation); it has no settings of its own.
    """

    size: int = 224
    infidelity: Mapping[str, Any] = _frozen(
        patch_sizes=(112, 56),
        samples=5,
        baseline="uniform",
        uniform_low=-1.0,
        uniform_high=1.0,
        scaling="optimal",
        absolute=False,
    )
    faithfulness_correlation: Mapping[str, Any] = _frozen(patch_size=56, baseline=0.0, absolute=True)
    faithfulness_estimate: Mapping[str, Any] = _frozen(features_in_step=3136, baseline=0.0, absolute=True)
    monotonicity_correlation: Mapping[str, Any] = _frozen(
        samples=10,
        features_in_step=3136,
        baseline="uniform",
        uniform_low=-1.0,
        uniform_high=1.0,
        absolute=True,
        eps=1e-12,
    )
    max_sensitivity: Mapping[str, Any] = _frozen(samples=10, radius=0.02)
    random_logit: Mapping[str, Any] = _frozen(seed=42, similarity="pearson")

    def __reduce__(self):
        # read-only views cannot be pickled (a spawned DDP worker receives the protocol): rebuilt from dicts
        return _protocol, (self.size, {m: dict(getattr(self, m)) for m in METRIC_NAMES})

    def settings(self, metric: str) -> dict[str, Any]:
        """The keyword arguments of ``metric`` (one of :data:`METRIC_NAMES`) as a new dict."""
        if metric not in METRIC_NAMES:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_NAMES)}")
        return dict(getattr(self, metric))

    def scaled(self, size: int) -> MetricProtocol:
        """The protocol for size x size images: patch sizes times size / self.size, features per step times
        (size / self.size)^2 (rounded; at least 1). Raises ValueError if a patch size would not divide ``size``."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")

        def side(p: int) -> int:
            q = max(1, round(p * size / self.size))
            if size % q:
                raise ValueError(f"patch size {p} at {self.size} px scales to {q}, which does not divide {size}")
            return q

        def area(f: int) -> int:
            return max(1, round(f * (size / self.size) ** 2))

        inf = dict(self.infidelity, patch_sizes=tuple(side(p) for p in self.infidelity["patch_sizes"]))
        fc = dict(self.faithfulness_correlation, patch_size=side(self.faithfulness_correlation["patch_size"]))
        fe = dict(self.faithfulness_estimate, features_in_step=area(self.faithfulness_estimate["features_in_step"]))
        mc = dict(
            self.monotonicity_correlation, features_in_step=area(self.monotonicity_correlation["features_in_step"])
        )
        return replace(
            self,
            size=size,
            infidelity=MappingProxyType(inf),
            faithfulness_correlation=MappingProxyType(fc),
            faithfulness_estimate=MappingProxyType(fe),
            monotonicity_correlation=MappingProxyType(mc),
        )


#: The published settings (224 x 224 images).
PUBLISHED = MetricProtocol()


def _protocol(size: int, settings: dict[str, dict[str, Any]]) -> MetricProtocol:
    """A :class:`MetricProtocol` from its size and plain per-metric dicts (unpickling)."""
    return MetricProtocol(size, **{m: MappingProxyType(v) for m, v in settings.items()})
