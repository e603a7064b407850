"""Finding tasks: jetfed's own, those installed packages publish under the
`jetfed.tasks` entry-point group (the packaging convention users know from pytest or
setuptools plugins), and any Task class named as `package.module:attr`.

Listing reads package metadata only: `jetfed tasks` and every --help name the
installed tasks without importing them (a task's import may load torch or its data
stack, seconds on a board)."""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Dict, Type

from jetfed.errors import UnknownTask
from jetfed.tasks.base import Task, TaskSettings

GROUP = "jetfed.tasks"
DEFAULT_TASK = "mnist"
# Always present, even when jetfed runs from a checkout that pip never installed.
BUILTIN: Dict[str, str] = {
    "mnist": "jetfed.tasks.mnist:MnistTask",
    "image-folder": "jetfed.tasks.image_folder:ImageFolderTask",
}


def installed() -> Dict[str, str]:
    """Task name -> `module:attr`, jetfed's own first: a package cannot shadow them."""
    found = metadata.entry_points()
    if hasattr(found, "select"):
        entries = list(found.select(group=GROUP))
    else:  # Python 3.8/3.9 return a dict of groups
        entries = list(found.get(GROUP, []))
    tasks = dict(BUILTIN)
    for entry in entries:
        tasks.setdefault(entry.name, entry.value)
    return dict(sorted(tasks.items()))


def task_class(spec: str) -> Type[Task]:
    """The Task class `spec` names: an installed task's name, or `package.module:attr`."""
    tasks = installed()
    target = tasks.get(spec, spec)
    if ":" not in target:
        raise UnknownTask(
            f"--task: no task {spec!r} is installed; installed: {', '.join(tasks)}. Install the package that "
            f"publishes it (pip install ...), or name its class as package.module:attr"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownTask(f"--task {spec}: cannot import {module_name}: {exc}; install the package that holds it "
                          "into this service's Python, or fix the name") from None
    found = getattr(module, attr, None)
    if not (isinstance(found, type) and issubclass(found, Task)):
        raise UnknownTask(f"--task {spec}: {target} is {'missing' if found is None else type(found).__name__}, "
                          "not a jetfed.tasks.Task subclass")
    if not found.name:
        raise UnknownTask(f"--task {spec}: {target} sets no `name`; a task needs one for the fleet to agree on")
    return found


def build_task(spec: str, settings: TaskSettings) -> Task:
    """The task `spec` names, built from a service's settings (its options checked)."""
    return task_class(spec)(settings)
