"""The pipeline's tasks, one file each; ``task: <name>`` in the config picks one (see :mod:`.base`)."""

from .base import Task
from .evaluate import EvaluateTask
from .figures import FiguresTask
from .path_stability import PathStabilityTask
from .published_table import PublishedTableTask
from .train import TrainTask

__all__ = ["TASKS", "Task"]

#: {name: task class}: a new task is a new file here and one entry below.
TASKS: dict[str, type[Task]] = {
    "figures": FiguresTask,
    "evaluate": EvaluateTask,
    "train": TrainTask,
    "path_stability": PathStabilityTask,
    "published_table": PublishedTableTask,
}
