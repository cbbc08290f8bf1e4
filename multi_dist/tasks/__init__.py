"""Pretraining and downstream tasks: what a batch carries, the loss, and the evaluation.

Every task plugs into the same training loop (:func:`multi_dist.train.train`) and the same
evaluation entry (:func:`multi_dist.evaluate.evaluate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import EvalContext, Task, TaskConfig, run_evaluation

if TYPE_CHECKING:
    from ..objectives import LossConfig

__all__ = ["EvalContext", "Task", "TaskConfig", "make_task", "run_evaluation", "task_class"]


def task_class(name: str) -> type[Task]:
    from .labels import LabelsTask
    from .pretrain import PretrainTask
    from .qa import ChoiceTask, OpenQATask
    from .retrieval import RetrievalTask

    classes: dict[str, type[Task]] = {
        "pretrain": PretrainTask,
        "qa": OpenQATask,
        "choice": ChoiceTask,
        "retrieval": RetrievalTask,
        "labels": LabelsTask,
    }
    return classes[name]


def make_task(cfg: TaskConfig, vocab: list[str] | None = None, seed: int = 0, loss: LossConfig | None = None) -> Task:
    cls = task_class(cfg.name)
    if cfg.name in ("pretrain", "retrieval"):
        return cls(cfg, vocab, seed, loss=loss)  # type: ignore[call-arg]
    return cls(cfg, vocab, seed)
