"""The certificate tool on an operator's laptop: `pip install '<checkout>[certs]'` and
`pip install 'jetfed-<version>-py3-none-any.whl[certs]'` (jetfed is not on PyPI) into
plain venvs, then `jetfed certs` provisions a federation, and no torch came with it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from board_python import board_env
from scratch_install import REPO

pytestmark = pytest.mark.slow
SOURCES = ("jetfed", "worker", "evaluator", "coordinator", "requirements", "pyproject.toml", "README.md")
MOST_PACKAGES = 20  # jetfed, its runtime list, cryptography: today 15 with their own needs


def checkout_copy(folder: Path) -> Path:
    """What a clone holds (with the generated stubs): pip builds in the source tree,
    so the build's leftovers land in this copy, not in the working tree."""
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, folder / name)
    return folder


def plain_venv(folder: Path) -> Path:
    """A venv on the base interpreter that sees none of its global packages."""
    subprocess.run([sys._base_executable, "-m", "venv", str(folder)], check=True, timeout=120)
    assert "include-system-site-packages = false" in (folder / "pyvenv.cfg").read_text()
    return folder


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(venv / "bin/python"), "-m", "pip", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def installed(venv: Path) -> List[str]:
    """What pip put in the venv, without pip's own tools."""
    listed = json.loads(pip(venv, "list", "--format=json").stdout)
    return sorted(p["name"].lower() for p in listed if p["name"].lower() not in ("pip", "setuptools"))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkout_copy(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def from_checkout(checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = plain_venv(tmp_path_factory.mktemp("laptop") / "venv")
    pip(venv, "install", "--quiet", f"{checkout}[certs]")
    return venv


@pytest.fixture(scope="module")
def from_wheel(checkout: Path, from_checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    pip(from_checkout, "wheel", "--quiet", "--no-deps", "-w", str(dist), str(checkout))
    (wheel,) = dist.glob("jetfed-*.whl")
    venv = plain_venv(tmp_path_factory.mktemp("laptop-wheel") / "venv")
    pip(venv, "install", "--quiet", f"{wheel}[certs]")
    return venv


@pytest.fixture(params=["checkout", "wheel"])
def laptop(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"from_{request.param}")


def test_certs_extra_brings_no_torch(laptop: Path) -> None:
    packages = installed(laptop)
    assert "cryptography" in packages and "jetfed" in packages
    assert not {"torch", "torchvision"} & set(packages), packages
    assert not [p for p in packages if p.startswith("nvidia")], packages
    assert len(packages) <= MOST_PACKAGES, f"{len(packages)} packages: {packages}"


def test_jetfed_certs_provisions_a_federation(laptop: Path, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    result = subprocess.run(
        [str(laptop / "bin/jetfed"), "certs", "--out", str(pki), "--coordinator", "coord",
         "--worker", "alice=127.0.0.1", "--evaluator", "testing"],
        capture_output=True, text=True, timeout=120, env=board_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("coord", "alice", "testing"):
        assert (pki / node / f"{node}.crt").is_file() and (pki / node / f"{node}.key").is_file(), node
    assert (pki / "ca.key").is_file()
