"""The tasks' LightningModules, one file each: what a task computes per batch (``predict_step``) or trains
(``training_step``). Timing, stopping and result gathering are callbacks of the run skeleton, not theirs."""

from .evaluate import EvaluateModule
from .path_stability import PathStabilityModule
from .pullbacks import PullbackModule
from .train import TrainModule

__all__ = ["EvaluateModule", "PathStabilityModule", "PullbackModule", "TrainModule"]
