"""The real `jetfed` entry point, run as a subprocess of the dev venv's python: help
lists every registered command with a line each, --version names the installed
distribution, an unknown command is named and exits 2, all without importing torch."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from typing import List

import pytest

from jetfed.cli import missing_message, shorten

COMMANDS = ("certs", "coordinator", "evaluator", "export", "report", "simulate", "strategies", "tasks", "worker")


def jetfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jetfed.cli", *args], capture_output=True, text=True, timeout=60)


def command_lines(text: str) -> List[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith("-")]


def test_help_lists_each_command_with_its_docstring_line() -> None:
    result = jetfed("--help")
    assert result.returncode == 0, result.stderr
    lines = command_lines(result.stdout)
    assert [line.split()[0] for line in lines] == list(COMMANDS), result.stdout
    described = dict(line.split(None, 1) for line in lines)
    assert described["worker"] == "load this board's partition, then serve Train and Evaluate"
    assert described["evaluator"] == "load the test set, then serve Evaluate"
    assert described["certs"] == "provisioning a federation's private CA and one certificate per node"
    assert all(len(text) <= 80 for text in described.values()), described
    assert "--version" in result.stdout


def test_help_does_not_import_the_commands() -> None:
    """Reading docstrings from source keeps `jetfed --help` fast on a board: no torch."""
    probe = "import sys; from jetfed.cli import main, usage, _commands; usage(_commands()); " \
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'coordinator', 'evaluator')))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # find_spec imports a command's parent package (its __init__ only), never the command.
    assert result.stdout.strip() == "['coordinator', 'coordinator.strategies', 'evaluator', 'worker']", result.stdout


def test_no_arguments_print_the_commands_and_exit_2() -> None:
    result = jetfed()
    assert result.returncode == 2
    assert [line.split()[0] for line in command_lines(result.stderr)] == list(COMMANDS), result.stderr


def test_version_is_the_installed_distribution() -> None:
    result = jetfed("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"jetfed {metadata.version('jetfed')}\n"


def test_unknown_command_is_named_and_the_known_ones_listed() -> None:
    result = jetfed("wroker", "--help")
    assert result.returncode == 2
    assert result.stderr.startswith("jetfed: unknown command 'wroker'\n"), result.stderr
    assert [line.split()[0] for line in command_lines(result.stderr)] == list(COMMANDS)


def test_a_command_still_gets_its_own_help() -> None:
    result = jetfed("certs", "--help")
    assert result.returncode == 0, result.stderr
    assert "--coordinator" in result.stdout


@pytest.mark.parametrize("module, says", [
    ("torch", "install this board's torch (JetPack's wheel, see deploy/jetson/README.md) or "
              "`pip install -r requirements/torch.txt`"),
    ("torchvision.datasets", "install this board's torch"),
    ("cryptography.x509", "it is the 'certs' extra: pip install '<checkout or jetfed wheel>[certs]'"),
    ("matplotlib", "it is the 'report' extra"),
    ("prometheus_client", "it is missing from this install: reinstall with deploy/jetson/install.sh"),
])
def test_missing_module_message_names_the_fix(module: str, says: str) -> None:
    message = missing_message("worker", module)
    assert message.startswith(f"jetfed worker: no module named {module.split('.')[0]!r}; "), message
    assert says in message
    assert "\n" not in message


@pytest.mark.parametrize("docstring, line", [
    ("`jetfed worker`: load data,\nthen serve.\n\nMore.", "load data, then serve"),
    ("`jetfed report RUN_DIR`: plots (PNG) of a run. Details.", "plots of a run"),
    ("A long first clause that fills the line, then a second clause that would run past eighty columns",
     "a long first clause that fills the line"),
    ("CA files for nodes.", "CA files for nodes"),
    ("", ""),
])
def test_shorten(docstring: str, line: str) -> None:
    assert shorten(docstring) == line
