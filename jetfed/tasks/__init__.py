"""Tasks: the user's model and data, run on the boards (see base.Task).

`from jetfed.tasks import Task` works as usual; the names load on first use, so
finding `jetfed.tasks.listing` (as `jetfed --help` does) does not import torch."""

from typing import Any

_NAMES = {
    "Evaluation": "jetfed.tasks.base", "Examples": "jetfed.tasks.base", "Option": "jetfed.tasks.base",
    "Task": "jetfed.tasks.base", "TensorExamples": "jetfed.tasks.base", "TaskSettings": "jetfed.tasks.base", "TrainOutcome": "jetfed.tasks.base",
    "DEFAULT_TASK": "jetfed.tasks.registry", "build_task": "jetfed.tasks.registry",
    "installed": "jetfed.tasks.registry", "task_class": "jetfed.tasks.registry",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'jetfed.tasks' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_NAMES[name]), name)
