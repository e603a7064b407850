"""install.sh on JetPack 5's Python 3.8 and JetPack 6's 3.10: a real venv and that
Python's own pip, so the runtime list's markers are evaluated by the installer (tomli
below 3.11) and pip picks the releases those Pythons get (grpcio 1.70 and protobuf 5.29
on 3.8). This machine has no torch for these Pythons, so the services cannot start
here (test_board_install.py starts them on 3.11): every other import must resolve,
`jetfed --help` must work, and a service must say in one line that torch is missing.
One install per Python, about 22 s each."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

import pytest
from board_imports import board_modules
from board_python import JETPACK_MODULES, board_env, make_board_python, pyenv_python, unresolved
from scratch_install import run_install

pytestmark = pytest.mark.slow
JETPACKS = {"3.8": "JetPack 5", "3.10": "JetPack 6"}


def install(version: str, folder: Path) -> Optional[Path]:
    """The venv install.sh builds on a torch-less board Python `version`; None when this
    machine has no such interpreter."""
    base = pyenv_python(version)
    if base is None:
        return None
    python = make_board_python(base, folder / "system", with_torch=False)
    run_install(folder / "root", PYTHON=str(python))
    return folder / "root/opt/jetfed/venv"


@pytest.fixture(scope="module", params=sorted(JETPACKS), ids=lambda v: f"python{v}")
def venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One install per Python, shared by that Python's tests."""
    found = install(request.param, tmp_path_factory.mktemp(f"board{request.param}"))
    if found is None:
        pytest.skip(f"no Python {request.param} ({JETPACKS[request.param]}) under pyenv on this machine")
    return found


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                          env=board_env())


def python_version(venv: Path) -> str:
    return run(venv, "python", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()


def test_every_import_but_torch_resolves(venv: Path) -> None:
    version = python_version(venv)
    modules = [m for m in board_modules(version) if m.split(".")[0] not in JETPACK_MODULES]
    assert "tomli" in modules, "below 3.11 the coordinator reads TOML with tomli"
    assert unresolved(venv / "bin/python", modules) == []


def test_installed_requirements_are_consistent(venv: Path) -> None:
    check = run(venv, "python", "-m", "pip", "check")
    assert [line for line in check.stdout.splitlines() if "jetfed" in line] == [], check.stdout + check.stderr


def test_jetfed_help_and_version_work_without_torch(venv: Path) -> None:
    usage = run(venv, "jetfed", "--help")
    assert usage.returncode == 0, usage.stderr
    assert "worker" in usage.stdout and "coordinator" in usage.stdout
    assert run(venv, "jetfed", "--version").stdout == "jetfed 0.1.0\n"


@pytest.mark.parametrize("command", ["worker", "evaluator", "coordinator"])
def test_a_service_without_torch_says_so_in_one_line(venv: Path, command: str) -> None:
    result = run(venv, "jetfed", command, "--help")
    assert result.returncode == 2
    assert result.stderr == (
        f"jetfed {command}: no module named 'torch'; install this board's torch (JetPack's wheel, "
        "see deploy/jetson/README.md) or `pip install -r requirements/torch.txt`\n"
    )
