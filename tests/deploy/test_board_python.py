"""Code that runs on a board stays Python 3.8 compatible (JetPack 5's Python)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOARD_PACKAGES = ("jetfed", "worker", "evaluator", "coordinator")
GENERATED = "jetfed/v1/"


def test_board_code_runs_on_python_3_8() -> None:
    vermin = Path(sys.executable).with_name("vermin")
    assert vermin.exists(), f"vermin is missing from {vermin.parent}: pip install -r requirements/dev.txt"
    result = subprocess.run(
        [str(vermin), "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
         "--exclude-regex", GENERATED, *BOARD_PACKAGES],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"needs more than Python 3.8:\n{result.stdout}{result.stderr}"
    # The generated stubs are grpcio-tools' business; everything else must be checked.
    expected = [
        p for package in BOARD_PACKAGES for p in (REPO / package).rglob("*.py*")
        if p.suffix in (".py", ".pyi") and GENERATED not in p.relative_to(REPO).as_posix()
    ]
    analyzed = re.search(r"Analyzing (\d+) files", result.stdout)
    assert analyzed and int(analyzed.group(1)) == len(expected), result.stdout
