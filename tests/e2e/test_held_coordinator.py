"""tools/held_coordinator.py, the coordinator run-local starts before its checks: it
says and writes nothing until told, ends quietly at end of input (a refused run), and
once told runs `jetfed coordinator` with the arguments given, its stderr in the log
named, after what its imports wrote. A real process each (imports take ~3 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HELD = Path(__file__).resolve().parents[2] / "tools" / "held_coordinator.py"


def test_end_of_input_ends_it_quietly() -> None:
    done = subprocess.run([sys.executable, str(HELD)], input=b"", capture_output=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_told_it_runs_the_coordinator_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "coordinator.log"
    log.write_bytes(b"an earlier attempt\n")
    order = {"log": str(log), "argv": ["--rounds", "1"]}
    done = subprocess.run([sys.executable, str(HELD)], input=json.dumps(order).encode() + b"\n",
                          capture_output=True, timeout=120)
    # The coordinator's own refusal of a run without workers (exit status 1), in the log.
    text = log.read_text()
    assert done.returncode == 1, text
    assert text.startswith("an earlier attempt\n")
    assert "ERROR coordinator: workers: at least one worker is needed" in text
    assert done.stderr == b""
