"""Every package board code imports is named in one of the shared lists, and only
those lists feed pyproject.toml and install.sh: a new import without its requirement
fails here in a second, before an install on a board finds it."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Dict, Set

from board_imports import (
    REPO, RUNTIME, distribution_of, dynamic_files, extras, normalize, requirements, third_party_imports,
)

INSTALL_SH = REPO / "deploy" / "jetson" / "install.sh"


def listed() -> Dict[str, str]:
    """Distribution -> the list naming it ("runtime" or an extra's name)."""
    names = {normalize(r.name): "runtime" for r in requirements(RUNTIME)}
    for extra, reqs in extras().items():
        names.update({normalize(r.name): extra for r in reqs})
    return names


def test_every_third_party_import_is_in_a_list() -> None:
    names = listed()
    runtime = {normalize(r.name): r for r in requirements(RUNTIME)}
    unlisted = []
    for module, files in sorted(third_party_imports().items()):
        dist = distribution_of(module)
        if dist is None:
            # Not installed in this venv: only fine for a runtime requirement whose marker
            # leaves it out of this Python (tomli on 3.11, which has tomllib).
            requirement = runtime.get(normalize(module.split(".")[0]))
            if requirement is None or requirement.marker is None or requirement.marker.evaluate():
                unlisted.append(f"{module} (imported by {sorted(files)}) is installed by no distribution here")
        elif dist not in names:
            unlisted.append(f"{module} (distribution {dist}, imported by {sorted(files)}) is in no requirements list")
    assert not unlisted, "\n".join(unlisted)


# Extras that are a feature of a service rather than a command of their own, and the
# one module of each that imports them, inside functions only: a board without the
# extra starts and refuses the feature with the install line (DP-SGD without opacus,
# secure aggregation without cryptography).
FEATURE_HOMES = {"privacy": {"jetfed/privacy.py"}, "certs": {"jetfed/secagg/keys.py"}}


def module_level_imports(path: Path) -> Set[str]:
    """The absolute imports a file runs when it is imported (not those in functions)."""
    found: Set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                else ():
            if isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                found.add(inner.module)
    return found


def test_an_extra_is_imported_only_by_its_own_command() -> None:
    """Boards install no extras: cryptography may appear only in `jetfed certs`'s module
    (and lazily in secure aggregation's keys), matplotlib only in `jetfed report`'s, or a
    service would fail to start there."""
    commands = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["jetfed.commands"]
    strays = []
    for extra, reqs in extras().items():
        if extra == "torch":
            continue
        features = FEATURE_HOMES.get(extra, set())
        assert extra in commands or features, f"extra {extra!r} is named for no jetfed command nor feature"
        homes = {commands[extra].partition(":")[0].replace(".", "/") + ".py"} if extra in commands else set()
        dists = {normalize(r.name) for r in reqs}
        for module, files in third_party_imports().items():
            if distribution_of(module) in dists and not files <= homes | features:
                strays.append(f"{module} ({extra} extra) imported by {sorted(files - homes - features)}")
        for home in features:
            eager = [m for m in module_level_imports(REPO / home) if distribution_of(m) in dists]
            if eager:
                strays.append(f"{home} imports {eager} ({extra} extra) when it is imported, not lazily")
    assert not strays, "\n".join(strays)


def test_every_runtime_requirement_is_imported() -> None:
    """A runtime requirement no board code imports is weight on every board."""
    used: Set[str] = set()
    for module in third_party_imports():
        used.add(distribution_of(module) or normalize(module.split(".")[0]))
    assert {normalize(r.name) for r in requirements(RUNTIME)} - used == set()


def test_pyproject_reads_the_shared_lists_and_torch_is_an_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "dependencies" not in project and "optional-dependencies" not in project
    assert {"dependencies", "optional-dependencies"} <= set(project["dynamic"])
    files = dynamic_files()
    assert files["dependencies"] == [RUNTIME]
    assert sorted(normalize(r.name) for r in requirements(files["torch"][0])) == ["pillow", "torch", "torchvision"]
    assert not {"torch", "torchvision"} & {normalize(r.name) for r in requirements(RUNTIME)}
    dev = (REPO / "requirements" / "dev.txt").read_text()
    for path in {p for paths in files.values() for p in paths}:
        assert f"-r {path.name}" in dev, f"requirements/dev.txt must include {path.name}, not repeat its pins"


def test_install_sh_installs_the_runtime_list_and_nothing_by_name() -> None:
    """Package names typed into install.sh drift from pyproject.toml (prometheus-client,
    rich and tomli once did); the only names allowed are pip itself and the stub tool."""
    installs = [line.strip() for line in INSTALL_SH.read_text().splitlines() if re.search(r"pip install", line)]
    assert any('-r "$src/requirements/runtime.txt"' in line for line in installs), installs
    assert any("--no-deps" in line and '"$src"' in line for line in installs), installs
    others = [line for line in installs if "requirements/runtime.txt" not in line and "--no-deps" not in line]
    assert all("--upgrade pip" in line or "grpcio-tools==" in line for line in others), others
