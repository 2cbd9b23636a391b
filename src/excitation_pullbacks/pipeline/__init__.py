"""Experiment pipeline over the core: Hydra configs, data selection, Lightning predict runner, figures.

Imports Hydra, Lightning and W&B; the core package (``excitation_pullbacks``) does not depend on it.
"""

from .errors import PipelineError

__all__ = ["PipelineError"]
