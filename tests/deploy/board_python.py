"""A board's Python, built on this machine: a pyenv interpreter whose system
site-packages hold only what JetPack puts there (torch, torchvision and what they
need), never the packages this machine's interpreters carry globally. install.sh's
`venv --system-site-packages` then sees exactly a board's system, so a runtime
dependency the install forgets is missing for real.

The interpreter is a copy of the pyenv binary (a few KiB: it links libpython by an
absolute path) beside a `lib/pythonX.Y` of symlinks to the real standard library, with
a site-packages of our own. Torch is linked in from the dev venv, no gigabytes copied."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from packaging.requirements import Requirement

PYENV = Path("/root/.pyenv/versions")
JETPACK_DISTRIBUTIONS = ("torch", "torchvision")
# What they bring for board code to import: torchvision decodes images with Pillow.
JETPACK_MODULES = ("torch", "torchvision", "PIL")


def pyenv_python(version: str) -> Optional[Path]:
    """The newest pyenv interpreter of a minor version ("3.8"), if this machine has one."""
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"), key=lambda p: [int(x) for x in
                   re.findall(r"\d+", p.parts[-3])])
    return found[-1] if found else None


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: Iterable[str]) -> Set[str]:
    """The distributions `roots` need in this venv, extras they ask for included, with
    markers evaluated for this interpreter (the dev venv stands in for a board's system)."""
    wanted: List[Tuple[str, Tuple[str, ...]]] = [(name, ()) for name in roots]
    seen: Set[Tuple[str, Tuple[str, ...]]] = set()
    found: Set[str] = set()
    while wanted:
        name, extras = wanted.pop()
        if (normalize(name), extras) in seen:
            continue
        seen.add((normalize(name), extras))
        dist = metadata.distribution(name)
        found.add(normalize(dist.metadata["Name"]))
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras)):
                wanted.append((requirement.name, tuple(sorted(requirement.extras))))
    return found


def _installed_paths() -> Dict[Tuple[str, ...], Set[str]]:
    """Every path prefix inside the dev venv's site-packages -> the distributions with
    files under it (namespace folders like nvidia/ are shared)."""
    owners: Dict[Tuple[str, ...], Set[str]] = {}
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"])
        for file in dist.files or []:
            parts = file.parts
            if parts[0] == ".." or "__pycache__" in parts:
                continue
            for depth in range(1, len(parts) + 1):
                owners.setdefault(parts[:depth], set()).add(name)
    return owners


def link_distributions(names: Set[str], site: Path) -> None:
    """Symlink into `site` the files of `names`, at the shallowest folder no other
    distribution shares, so nothing else of the dev venv shows through."""
    source = Path(metadata.distribution("torch").locate_file(""))
    owners = _installed_paths()
    linked: Set[Tuple[str, ...]] = set()
    for prefix, holders in sorted(owners.items(), key=lambda item: len(item[0])):
        if not holders <= names or any(prefix[:depth] in linked for depth in range(1, len(prefix))):
            continue
        target = site.joinpath(*prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.joinpath(*prefix))
        linked.add(prefix)


def make_board_python(base: Path, folder: Path, with_torch: bool) -> Path:
    """An interpreter under `folder` running `base`'s standard library, whose system
    site-packages hold torch and its requirements when `with_torch` (linked from the
    dev venv, which must run the same Python version), and nothing else."""
    home = Path(subprocess.run([str(base), "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                               text=True, check=True).stdout.strip())
    version = base.name[len("python"):]
    stdlib = home / "lib" / f"python{version}"
    lib = folder / "lib" / f"python{version}"
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    (lib / "site-packages").mkdir()
    (folder / "bin").mkdir()
    python = folder / "bin" / base.name
    shutil.copy2(base, python)
    if with_torch:
        assert f"{sys.version_info[0]}.{sys.version_info[1]}" == version, "torch comes from the dev venv's Python"
        link_distributions(closure(JETPACK_DISTRIBUTIONS), lib / "site-packages")
    return python


def unresolved(python: Path, modules: Iterable[str]) -> List[str]:
    """The modules `python` cannot find, each with the error: find_spec imports a dotted
    name's parents, so "grpc_health.v1.health" checks the whole chain."""
    probe = (
        "import importlib.util, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        found = importlib.util.find_spec(name) is not None\n"
        "    except Exception as exc:\n"
        "        found = False; print(name, repr(exc))\n"
        "    else:\n"
        "        print('' if found else name + ' not found')\n"
    )
    result = subprocess.run([str(python), "-c", probe, *modules], capture_output=True, text=True, timeout=120,
                            env=board_env())
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def board_env() -> Dict[str, str]:
    """A service's environment on a board: no PYTHONPATH into the checkout, no user site."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
