"""Evaluation metrics for attribution maps and counterfactuals, batched and on the inputs' device.

Maps come from *explain* functions (:data:`~excitation_pullbacks.explain.Explain`). Every metric returns
per-sample tensors, so a table entry is a mean over images.

- :mod:`.perturbation`: :func:`deletion`, :func:`insertion`: target score as top-attributed pixels are
  removed / revealed; AUC.
- :mod:`.randomization`: :func:`randomization_check`, cascading model-parameter randomization (Adebayo et
  al. 2018) with the :mod:`.similarity` measures :func:`spearman` and :func:`ssim` (Wang et al. 2004).
- :mod:`.counterfactual`: :func:`ascent_scores`, :func:`transfer_scores`, :func:`transfer`: logit gain and
  top-1 flips of counterfactuals, on the model that made them or on others.
- :mod:`.structure`: :func:`high_frequency_energy`, :func:`total_variation`.
- :mod:`.filters`: :func:`gaussian_blur` (the deletion/insertion baseline).

Only torch is imported here.
"""

from ..explain import Explain
from .counterfactual import AscentScores, TransferResult, ascent_scores, transfer, transfer_scores
from .filters import gaussian_blur, gaussian_kernel
from .perturbation import Baseline, deletion, insertion, perturbation_auc, perturbation_curves, pixel_scores
from .randomization import RandomizationResult, randomization_check, randomization_layers
from .similarity import spearman, ssim
from .structure import high_frequency_energy, total_variation

__all__ = [
    "AscentScores",
    "Baseline",
    "Explain",
    "RandomizationResult",
    "TransferResult",
    "ascent_scores",
    "deletion",
    "gaussian_blur",
    "gaussian_kernel",
    "high_frequency_energy",
    "insertion",
    "perturbation_auc",
    "perturbation_curves",
    "pixel_scores",
    "randomization_check",
    "randomization_layers",
    "spearman",
    "ssim",
    "total_variation",
    "transfer",
    "transfer_scores",
]
