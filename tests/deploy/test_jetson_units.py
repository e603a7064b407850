"""The systemd units as installed: systemd-analyze finds nothing to say about them,
and the command lines they build from the example env files are ones the services
accept."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest
from coordinator.cli import parse_args as coordinator_args
from coordinator.cli import settings_from
from evaluator.cli import parse_args as evaluator_args
from jetfed.data import parse_labels
from worker.cli import parse_args as worker_args

from scratch_install import JETSON, run_install
from unitfiles import command_line

WORKERS = {"alice": ("0-3", "8777"), "bob": ("4-6", "8778"), "charlie": ("7-9", "8779")}
UNITS = [f"jetfed-worker@{name}.service" for name in WORKERS] + ["jetfed-evaluator.service", "jetfed-coordinator.service"]
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


@pytest.fixture(scope="module")
def board_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root as install.sh leaves it, plus what `verify --root` needs: the
    ExecStart binary (a stub; verify checks only that it is executable) and the host's
    own units for the targets ours depend on."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: apt-get install systemd"
    root = tmp_path_factory.mktemp("board")
    run_install(root, "--no-venv")
    jetfed = root / "opt/jetfed/venv/bin/jetfed"
    jetfed.parent.mkdir(parents=True)
    jetfed.write_text("#!/bin/sh\n")
    jetfed.chmod(0o755)
    host = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    assert host, f"no systemd unit folder with sysinit.target among {HOST_UNIT_DIRS}"
    shutil.copytree(host, root / "usr/lib/systemd/system", symlinks=True)
    return root


def verify(root: Path, unit: str) -> List[str]:
    """What `systemd-analyze verify` says about our units (the host's own units may be
    noisy; their lines are not ours to judge), plus its exit status when non-zero."""
    result = subprocess.run(
        ["systemd-analyze", f"--root={root}", "verify", unit], capture_output=True, text=True, timeout=60,
    )
    said = [line for line in (result.stdout + result.stderr).splitlines() if "jetfed" in line]
    return said + ([f"exit status {result.returncode}"] if result.returncode else [])


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(board_root: Path, unit: str) -> None:
    assert verify(board_root, unit) == []


def test_verify_reports_a_broken_unit(board_root: Path) -> None:
    """The check above is only worth something if verify reads our files under --root."""
    good = (board_root / "etc/systemd/system/jetfed-evaluator.service").read_text()
    broken = board_root / "etc/systemd/system/jetfed-broken.service"
    broken.write_text(good.replace("ProtectSystem=", "ProtectSystm=").replace("/venv/bin/jetfed", "/venv/bin/nothing"))
    said = "\n".join(verify(board_root, broken.name))
    assert "Unknown key 'ProtectSystm'" in said and "/venv/bin/nothing" in said, said


@pytest.mark.parametrize("name", WORKERS)
def test_worker_command_line_is_accepted(name: str) -> None:
    argv = command_line(JETSON / "jetfed-worker@.service", JETSON / f"env/worker-{name}.env", name)
    assert argv[:2] == ["/opt/jetfed/venv/bin/jetfed", "worker"]
    args = worker_args(argv[2:])
    assert (args.name, args.labels, str(args.port)) == (name, *WORKERS[name])
    assert args.data_dir == "/var/lib/jetfed/mnist"
    parse_labels(args.labels)


def test_evaluator_command_line_is_accepted() -> None:
    argv = command_line(JETSON / "jetfed-evaluator.service", JETSON / "env/evaluator.env")
    assert argv[:2] == ["/opt/jetfed/venv/bin/jetfed", "evaluator"]
    args = evaluator_args(argv[2:])
    assert (args.name, args.port) == ("testing", 8780)


def test_coordinator_command_line_is_accepted() -> None:
    argv = command_line(JETSON / "jetfed-coordinator.service", JETSON / "env/coordinator.env")
    assert argv[:2] == ["/opt/jetfed/venv/bin/jetfed", "coordinator"]
    args = coordinator_args(argv[2:])
    settings = settings_from(args)
    assert settings.resume, "a restarted coordinator must continue its run, not refuse the folder"
    assert list(settings.workers) == list(WORKERS) and settings.evaluator
    assert settings.rounds == 40 and str(settings.out_dir) == "/var/lib/jetfed/runs/fleet"
