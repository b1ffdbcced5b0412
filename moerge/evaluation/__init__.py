"""Evaluate any expert pool on any tasks: the task-set format (:mod:`.tasks`), its metrics
(:mod:`.metrics`), the methods and their hyper-parameter grids (:mod:`.methods`), and
:func:`evaluate`, which writes the comparison table users choose a method by."""

from moerge.evaluation.evaluate import EvaluationError, evaluate, write_report
from moerge.evaluation.methods import DEFAULT_METHODS, METHODS
from moerge.evaluation.report import MethodRow, QualityReport
from moerge.evaluation.tasks import TaskSet, TaskSetError, load_task_set

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "EvaluationError",
    "MethodRow",
    "QualityReport",
    "TaskSet",
    "TaskSetError",
    "evaluate",
    "load_task_set",
    "write_report",
]
