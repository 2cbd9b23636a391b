"""The ``baselines`` config node as the options of the Captum baseline explainers (figures and evaluate)."""

from __future__ import annotations

__all__ = ["baseline_options"]


def baseline_options(b) -> dict:
    """The ``baselines`` config node -> keyword options of :func:`excitation_pullbacks.baselines.explainer`."""
    return dict(
        smoothgrad_samples=int(b.smoothgrad_samples),
        smoothgrad_noise=float(b.smoothgrad_noise),
        ig_steps=int(b.ig_steps),
        ig_baseline=float(b.ig_baseline),
        batch_size=b.get("batch_size"),
    )
