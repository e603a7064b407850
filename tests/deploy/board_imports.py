"""What board code imports from outside itself, and the requirement lists that must
provide it: requirements/runtime.txt (installed on every board), requirements/torch.txt
(JetPack's torch) and the extras pyproject.toml reads from requirements/."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
BOARD_PACKAGES = ("jetfed", "worker", "evaluator", "coordinator")
RUNTIME = REPO / "requirements" / "runtime.txt"


def imported_modules(path: Path) -> Set[str]:
    """Absolute imports anywhere in a file, functions and try blocks included: a lazy
    import still has to resolve on the board when its code runs."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def third_party_imports() -> Dict[str, Set[str]]:
    """Dotted module name -> the board files (relative to the repo) that import it,
    for every module neither in the standard library nor first-party."""
    imports: Dict[str, Set[str]] = {}
    for package in BOARD_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for module in imported_modules(path):
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in BOARD_PACKAGES:
                    imports.setdefault(module, set()).add(path.relative_to(REPO).as_posix())
    return imports


def requirements(path: Path) -> List[Requirement]:
    """A requirements file's requirement lines (comments, blanks and pip options out)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dynamic_files() -> Dict[str, List[Path]]:
    """pyproject.toml's dynamic lists: "dependencies" and one entry per extra."""
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    lists = {"dependencies": [REPO / f for f in dynamic["dependencies"]["file"]]}
    for extra, spec in dynamic["optional-dependencies"].items():
        lists[extra] = [REPO / f for f in spec["file"]]
    return lists


def extras() -> Dict[str, List[Requirement]]:
    """Extra name -> its requirements, as pyproject.toml builds them."""
    return {name: [r for f in files for r in requirements(f)]
            for name, files in dynamic_files().items() if name != "dependencies"}


@lru_cache(maxsize=None)
def _packages() -> Mapping[str, List[str]]:
    return metadata.packages_distributions()


def distribution_of(module: str) -> Optional[str]:
    """The distribution in this venv whose files hold `module`; None when no installed
    distribution does (tomli has no place on Python 3.11). A shared namespace like
    google/ is narrowed to the distribution that holds the module's own folder."""
    candidates = _packages().get(module.split(".")[0], [])
    if len(candidates) > 1:
        prefix = module.split(".")
        candidates = [name for name in candidates
                      if any(f.parts[:len(prefix)] == tuple(prefix) or f.parts[:len(prefix)] ==
                             (*prefix[:-1], prefix[-1] + ".py") for f in metadata.files(name) or [])]
    assert len(set(map(normalize, candidates))) <= 1, f"{module} is in several distributions: {candidates}"
    return normalize(candidates[0]) if candidates else None


def board_modules(python_version: str) -> List[str]:
    """Third-party modules the services import on a board's Python `python_version`
    ("3.8"), torch and torchvision included: not the ones only an extra's command uses
    (cryptography for `jetfed certs`, matplotlib for `jetfed report`), nor those whose
    runtime requirement's marker leaves out that Python (tomli from 3.11 on)."""
    extra_names = {normalize(r.name) for name, reqs in extras().items() if name != "torch" for r in reqs}
    runtime = {normalize(r.name): r for r in requirements(RUNTIME)}
    wanted = []
    for module in third_party_imports():
        dist = distribution_of(module) or normalize(module.split(".")[0])
        marker = runtime[dist].marker if dist in runtime else None
        if dist not in extra_names and (marker is None or marker.evaluate({"python_version": python_version})):
            wanted.append(module)
    return sorted(wanted)
