"""install.sh for real, then the services from what it installed: a Python 3.11 whose
system site-packages hold only torch and what torch needs (as JetPack's do), the venv
install.sh builds on it, and a worker pair, the evaluator and a two-round coordinator
started from that venv's `jetfed`. A runtime dependency the install forgets fails here.
One install (about 25 s) is shared by the module."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import pytest
from board_imports import board_modules
from board_python import board_env, make_board_python, pyenv_python, unresolved
from scratch_install import run_install

from tests.conftest import free_port
from tests.integration.processes import HOST, START_TIMEOUT_S, Process, stop, wait_serving

pytestmark = pytest.mark.slow
COMMANDS = ("certs", "coordinator", "evaluator", "export", "report", "tasks", "worker")
WORKERS = {"alice": "0-4", "bob": "5-9"}


@dataclass
class Board:
    python: Path  # the board's system Python, torch in its site-packages
    venv: Path

    @property
    def jetfed(self) -> Path:
        return self.venv / "bin" / "jetfed"


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Board:
    base = pyenv_python("3.11")
    if base is None:
        pytest.skip("no pyenv Python 3.11 to build a board's Python from")
    folder = tmp_path_factory.mktemp("board311")
    python = make_board_python(base, folder / "system", with_torch=True)
    run_install(folder / "root", PYTHON=str(python))
    return Board(python, folder / "root/opt/jetfed/venv")


def test_venv_takes_the_system_torch_and_installs_none(board: Board) -> None:
    assert "include-system-site-packages = true" in (board.venv / "pyvenv.cfg").read_text()
    assert not list(board.venv.glob("lib/python*/site-packages/torch*")), "pip installed a torch wheel"
    where = subprocess.run([str(board.venv / "bin/python"), "-c", "import torch; print(torch.__file__)"],
                           capture_output=True, text=True, timeout=120, env=board_env())
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(board.python.parents[1])), where.stdout


def test_the_system_python_has_none_of_the_runtime_list(board: Board) -> None:
    """Else the install could forget a package and the board's Python would hide it."""
    runtime = ["grpc", "rich", "prometheus_client", "safetensors", "google.protobuf"]
    assert [line.split()[0] for line in unresolved(board.python, runtime)] == runtime


def test_every_board_import_resolves_in_the_venv(board: Board) -> None:
    assert unresolved(board.venv / "bin/python", board_modules("3.11")) == []


def test_installed_requirements_are_consistent(board: Board) -> None:
    """pip check holds jetfed's own metadata (pyproject's list) against what is there.
    Only jetfed's lines count: the venv's own setuptools shadows the system's one, older
    than this torch asks for, which is a venv's business, not the install's."""
    check = subprocess.run([str(board.venv / "bin/python"), "-m", "pip", "check"], capture_output=True, text=True,
                           timeout=120, env=board_env())
    assert [line for line in check.stdout.splitlines() if "jetfed" in line] == [], check.stdout + check.stderr


def test_jetfed_help_and_version(board: Board) -> None:
    usage = subprocess.run([str(board.jetfed), "--help"], capture_output=True, text=True, timeout=60, env=board_env())
    assert usage.returncode == 0, usage.stderr
    assert [line.split()[0] for line in usage.stdout.splitlines()[3:3 + len(COMMANDS)]] == list(COMMANDS)
    version = subprocess.run([str(board.jetfed), "--version"], capture_output=True, text=True, timeout=60,
                             env=board_env())
    assert version.stdout == "jetfed 0.1.0\n", version.stderr


def start_service(board: Board, name: str, args: List[str], logs: Path) -> Process:
    port = free_port()
    log = logs / f"{name}.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen([str(board.jetfed), *args, "--host", HOST, "--port", str(port)], stdout=handle,
                                 stderr=subprocess.STDOUT, env=board_env(), cwd=logs)
    return Process(name, f"{HOST}:{port}", popen, log)


@pytest.fixture
def fleet(board: Board, tiny_mnist: Path, tmp_path: Path) -> Iterator[List[Process]]:
    common = ["--data-dir", str(tiny_mnist), "--no-download", "--threads", "1"]
    started = [start_service(board, name, ["worker", "--name", name, "--labels", labels, *common], tmp_path)
               for name, labels in WORKERS.items()]
    started.append(start_service(board, "testing", ["evaluator", "--name", "testing", *common], tmp_path))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in started:
            wait_serving(process, deadline)
        yield started
    finally:
        codes = stop(started)
    assert codes == {p.name: 0 for p in started}, "\n".join(p.output() for p in started)


def run_in_terminal(command: List[str], cwd: Path, timeout: float) -> tuple:
    """Run `command` with a pseudo-terminal as stdout, as an operator does: the
    coordinator then draws its live panel with rich (off a terminal it never imports it)."""
    main, child = pty.openpty()
    popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=child, stderr=child, env=board_env(), cwd=cwd)
    os.close(child)
    output = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            output.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = popen.wait(timeout)
    finally:
        if popen.poll() is None:
            popen.kill()
        reader.join(10)
        os.close(main)
    return code, output.decode(errors="replace")


def test_the_installed_services_run_two_rounds(board: Board, fleet: List[Process], tmp_path: Path) -> None:
    workers = [f"--worker={p.name}={p.address}" for p in fleet[:-1]]
    out = tmp_path / "run"
    code, output = run_in_terminal(
        [str(board.jetfed), "coordinator", *workers, "--evaluator", fleet[-1].address, "--rounds", "2",
         "--eval-every", "1", "--batches", "5", "--out", str(out), "--connect-timeout", "60",
         "--round-timeout", "60", "--eval-timeout", "60"],
        tmp_path, timeout=120,
    )
    assert code == 0, output
    assert "Traceback" not in output, output
    assert re.search(r"round \d/2\s+elapsed", output), "no live panel drawn in the terminal:\n" + output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["workers"] == list(WORKERS) for r in records), records
