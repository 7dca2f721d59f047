"""Qt-free parts of the MedDiffFM Slicer module: MRML <-> volume conversion, task logic, child-process runner.

These import MRML (``slicer``) but never Qt, CTK or the Slicer application, so they work inside Slicer,
in ``Slicer --no-main-window`` scripts, and headlessly with the ``slicer-core`` package (the tests).
``runner`` imports neither Qt nor Slicer.
"""

from .logic import (
    DEVICE_LABELS,
    REGION_LABELS,
    TASKS,
    PreparedInputs,
    RunningTask,
    TaskInfo,
    TaskLogic,
    TaskParameters,
    TaskResult,
    available_tasks,
    task_available,
)
from .runner import ChildJob, RunOutcome, cli_arguments, kill_process_tree, parse_line

__all__ = [
    "DEVICE_LABELS",
    "REGION_LABELS",
    "TASKS",
    "PreparedInputs",
    "RunningTask",
    "TaskInfo",
    "TaskLogic",
    "TaskParameters",
    "TaskResult",
    "available_tasks",
    "task_available",
    "ChildJob",
    "RunOutcome",
    "cli_arguments",
    "kill_process_tree",
    "parse_line",
]
