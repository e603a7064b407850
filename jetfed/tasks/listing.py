"""`jetfed tasks`: the tasks this Python can run (jetfed's own and those installed
packages publish under `jetfed.tasks`), each with its options."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from jetfed.errors import JetfedError
from jetfed.tasks.registry import BUILTIN, DEFAULT_TASK, installed, task_class


def describe_tasks() -> List[str]:
    """One paragraph per task; a task whose package fails to import says why."""
    lines: List[str] = []
    for name, target in installed().items():
        origin = "jetfed" if BUILTIN.get(name) == target else target
        default = " (default)" if name == DEFAULT_TASK else ""
        try:
            found = task_class(name)
        except JetfedError as exc:
            lines += [f"{name}{default}  [{origin}]", f"    cannot be loaded: {exc}", ""]
            continue
        lines.append(f"{name}{default}  [{origin}]")
        if found.description:
            lines.append(f"    {found.description}")
        if found.default_model:
            lines.append(f"    model: {found.default_model} unless --model says otherwise")
        for key, option in found.options.items():
            default_text = "required" if option.default is None else f"default {option.default}"
            lines.append(f"    --option {key}=...  {option.help} ({default_text})")
        lines.append("")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfed tasks", description=__doc__)
    parser.parse_args(argv)
    print("\n".join(describe_tasks()).rstrip())
    print("\nA service runs one with --task NAME (or --task package.module:attr for a class no package publishes).")
    sys.stdout.flush()
    return 0
