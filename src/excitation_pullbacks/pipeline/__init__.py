"""Experiment pipeline over the core: Hydra configs, one run skeleton for every task, Lightning
``Trainer.predict`` on one or many devices, figures, metric tables and loggers.

Imports Hydra, Lightning and W&B; the core package (``excitation_pullbacks``) does not depend on it. Importing
it registers the config schemas (:mod:`.config`) with Hydra.
"""

from .config import CONFIG_DIR
from .errors import PipelineError

__all__ = ["CONFIG_DIR", "PipelineError"]
