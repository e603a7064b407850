"""install.sh into scratch roots: the tree it lays down and a second run that keeps what
an operator edited. The venv it builds is tested for real in test_board_install.py
(Python 3.11, services started) and test_board_python_sets.py (Python 3.8 and 3.10)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from scratch_install import REPO, run_install

UNITS = ("jetfed-worker@.service", "jetfed-evaluator.service", "jetfed-coordinator.service")
ENV_FILES = ("worker-alice.env", "worker-bob.env", "worker-charlie.env", "evaluator.env", "coordinator.env")


def exec_starts(root: Path) -> list:
    return [
        line.split()[0].partition("=")[2]
        for unit in UNITS for line in (root / "etc/systemd/system" / unit).read_text().splitlines()
        if line.startswith("ExecStart=")
    ]


def test_install_lays_out_the_tree(tmp_path: Path) -> None:
    run_install(tmp_path, "--no-venv")
    src = tmp_path / "opt/jetfed/src"
    for path in ("pyproject.toml", "README.md", "jetfed/codec.py", "jetfed/v1/worker_pb2_grpc.py", "worker/cli.py",
                 "evaluator/cli.py", "coordinator/cli.py", "protos/jetfed/v1/worker.proto"):
        assert (src / path).is_file(), path
    assert sorted(p.name for p in src.iterdir()) == sorted(
        ["coordinator", "evaluator", "jetfed", "protos", "pyproject.toml", "README.md", "requirements", "worker"])
    assert not list(src.rglob("__pycache__"))
    assert sorted(p.name for p in (tmp_path / "etc/systemd/system").iterdir()) == sorted(UNITS)
    assert sorted(p.name for p in (tmp_path / "etc/jetfed").iterdir()) == sorted(ENV_FILES)
    assert exec_starts(tmp_path) == ["/opt/jetfed/venv/bin/jetfed"] * len(UNITS)
    assert (tmp_path / "var/lib/jetfed/mnist").is_dir()
    assert not (tmp_path / "opt/jetfed/venv").exists()


def test_prefix_moves_code_and_units_with_it(tmp_path: Path) -> None:
    run_install(tmp_path, PREFIX="/srv/jetfed", JETFED_SKIP_VENV="1")
    assert (tmp_path / "srv/jetfed/src/jetfed/codec.py").is_file()
    assert exec_starts(tmp_path) == ["/srv/jetfed/venv/bin/jetfed"] * len(UNITS)
    assert not (tmp_path / "opt").exists()


def test_second_install_keeps_edited_env_files(tmp_path: Path) -> None:
    run_install(tmp_path, "--no-venv")
    alice = tmp_path / "etc/jetfed/worker-alice.env"
    alice.write_text("JETFED_PORT=9777\n")
    stale = tmp_path / "opt/jetfed/src/jetfed/removed_module.py"
    stale.write_text("")
    unit = tmp_path / "etc/systemd/system/jetfed-evaluator.service"
    unit.write_text("[Service]\n")
    again = run_install(tmp_path, "--no-venv")
    assert alice.read_text() == "JETFED_PORT=9777\n"
    assert f"kept {alice}" in again.stdout
    assert not stale.exists(), "src must mirror the repo: a module removed there is gone here"
    assert "ExecStart=" in unit.read_text(), "units are ours: a reinstall refreshes them"


def test_missing_stubs_without_venv_fail_clearly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("jetfed", "worker", "evaluator", "coordinator", "protos", "requirements", "pyproject.toml", "README.md",
                 "deploy"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, repo / name)
    shutil.rmtree(repo / "jetfed/v1")
    with pytest.raises(AssertionError, match="stubs are missing"):
        run_install(tmp_path / "root", "--no-venv", repo=repo)
