"""`make run-local` interrupted with Ctrl-C and resumed with the command it printed
ends with the very model an uninterrupted run with the same seed makes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_run_local import LAUNCHER, free_port_block, nothing_listens
from tests.e2e.test_run_local_mistakes import MAKE, SHELL_ENV

ROUNDS, SEED = 6, 7


def interrupt_after(command: List[str], line_prefix: str, timeout: float = 180) -> List[str]:
    """Run `command` in its own process group and send it SIGINT, as Ctrl-C in a terminal
    does, once a line starts with `line_prefix`; returns every line it printed."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=SHELL_ENV)
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(line_prefix) or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    # make dies by the signal (a shell then reports 130), or, when the launcher's exit
    # status 130 reaches make before the signal does (a loaded machine), reports the
    # launcher's "Error 130" and exits 2: either way the run stopped as Ctrl-C asked.
    assert proc.returncode == -signal.SIGINT or (proc.returncode == 2 and "run-local] Error 130" in rest), rest
    return lines + rest.splitlines()


def resume_command(lines: List[str]) -> str:
    """The command printed under "resume it with:"."""
    marker = next(i for i, line in enumerate(lines) if line.endswith("resume it with:"))
    return lines[marker + 1].strip()


@pytest.mark.slow  # over a minute; resume's equality is tests/integration/test_faults.py's, in make test
def test_interrupted_run_resumed_by_its_printed_command_equals_an_uninterrupted_one(
    real_mnist: Path, tmp_path: Path,
) -> None:
    base = free_port_block(5)
    out = tmp_path / "interrupted"
    variables = [f"DATA_DIR={real_mnist}", f"OUT={out}", f"ROUNDS={ROUNDS}", f"SEED={SEED}", f"BASE_PORT={base}",
                 "DEVICE=cpu"]
    lines = interrupt_after([*MAKE, *variables], "Training round 3/")
    output = "\n".join(lines)
    assert "run-local: interrupted; every service stopped" in output
    assert "make: *** [Makefile:" in output, output
    assert "run-local] Interrupt" in output or "run-local] Error 130" in output, output
    assert all(nothing_listens(base + i) for i in range(5)), "a service outlived an interrupted run-local"
    command = resume_command(lines)
    assert command.startswith(f"make run-local RESUME={out} DATA_DIR={real_mnist} ROUNDS={ROUNDS} SEED={SEED} "
                              f"BASE_PORT={base} DEVICE=cpu"), output
    assert not (out / "model.safetensors").exists()

    resumed = subprocess.run([*MAKE, *shlex.split(command)[2:]], capture_output=True, text=True, timeout=300,
                             env=SHELL_ENV)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming after round" in resumed.stdout

    straight = tmp_path / "straight"
    other = free_port_block(5)
    plain = subprocess.run([sys.executable, str(LAUNCHER), "--data-dir", str(real_mnist), "--out", str(straight),
                            "--rounds", str(ROUNDS), "--seed", str(SEED), "--base-port", str(other)],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    expected, got = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
