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
- :mod:`.faithfulness`: :func:`infidelity`, :func:`faithfulness_correlation`, :func:`faithfulness_estimate`,
  :func:`monotonicity_correlation`; :mod:`.robustness`: :func:`max_sensitivity`; :mod:`.randomization`:
  :func:`random_logit`; :mod:`.localisation`: :func:`focus` - Quantus 0.6's definitions, batched in torch
  (:mod:`.scoring` holds their shared pieces); :mod:`.protocol`: :data:`PUBLISHED`, the published settings.
- :mod:`.paired`: :func:`paired_difference`, mean difference of two methods' scores with a bootstrap interval.
- :mod:`.filters`: :func:`gaussian_blur` (the deletion/insertion baseline).

Only torch is imported here.
"""

from ..explain import Explain
from .counterfactual import AscentScores, TransferResult, ascent_scores, transfer, transfer_scores
from .faithfulness import faithfulness_correlation, faithfulness_estimate, infidelity, monotonicity_correlation
from .filters import gaussian_blur, gaussian_kernel
from .localisation import focus, quadrant_masks
from .paired import PairedDifference, paired_difference
from .perturbation import Baseline, deletion, insertion, perturbation_auc, perturbation_curves, pixel_scores
from .protocol import METRIC_NAMES, PUBLISHED, MetricProtocol
from .randomization import RandomizationResult, random_logit, randomization_check, randomization_layers
from .robustness import max_sensitivity
from .similarity import pearson, spearman, ssim
from .structure import high_frequency_energy, total_variation

__all__ = [
    "METRIC_NAMES",
    "PUBLISHED",
    "AscentScores",
    "Baseline",
    "Explain",
    "MetricProtocol",
    "PairedDifference",
    "RandomizationResult",
    "TransferResult",
    "ascent_scores",
    "deletion",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "focus",
    "gaussian_blur",
    "gaussian_kernel",
    "high_frequency_energy",
    "infidelity",
    "insertion",
    "max_sensitivity",
    "monotonicity_correlation",
    "paired_difference",
    "pearson",
    "perturbation_auc",
    "perturbation_curves",
    "pixel_scores",
    "quadrant_masks",
    "random_logit",
    "randomization_check",
    "randomization_layers",
    "spearman",
    "ssim",
    "total_variation",
    "transfer",
    "transfer_scores",
]
