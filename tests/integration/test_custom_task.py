"""examples/custom-task as a user ships it: the package installed with pip where the
boards run, a 3-worker federation on its task, and the coordinator started from an
environment where the package is NOT installed (it never needs task code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.processes import START_TIMEOUT_S, WORKERS, jetfed_command, start, stop, wait_serving

# make test-all: ~43 s of a fleet serving the example task (CI's 20 minutes);
# tests/unit/test_example_task.py runs in make test.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom-task"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed by pip into a folder of its own (the boards' site)."""
    target = tmp_path_factory.mktemp("board-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def test_the_example_task_federates_with_a_coordinator_that_lacks_it(
    installed: Path, tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(installed), str(ROOT)]))
    listing = subprocess.run(jetfed_command("tasks"), capture_output=True, text=True, timeout=120)
    assert "tiny-digits  [tiny_digits.task:TinyDigits]" in listing.stdout, listing.stdout
    common = ["--task", "tiny-digits", "--option", "hidden=32", "--data-dir", str(tiny_mnist), "--no-download",
              "--threads", "1"]
    processes = [start(name, ["worker", "--name", name, "--labels", labels, *common], tmp_path)
                 for name, labels in WORKERS.items()]
    processes.append(start("testing", ["evaluator", *common], tmp_path))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in processes:
            wait_serving(process, deadline)
        # The coordinator's environment: this checkout, without the boards' site.
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        lacks = subprocess.run([sys.executable, "-c", "import tiny_digits"], capture_output=True, timeout=60)
        assert lacks.returncode != 0, "the coordinator's environment must not hold the task package"
        out = tmp_path / "run"
        coordinator = subprocess.run(
            jetfed_command("coordinator", "--task", "tiny-digits", "--rounds", "3", "--eval-every", "1",
                           "--out", str(out), "--evaluator", f"testing={processes[-1].address}",
                           *[f"--worker={p.name}={p.address}" for p in processes[:-1]]),
            capture_output=True, text=True, timeout=300,
        )
        assert coordinator.returncode == 0, coordinator.stdout + coordinator.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(sorted(r["workers"]) == sorted(WORKERS) for r in records)
        accuracy = [r["evaluation"]["global"]["metrics"]["accuracy"] for r in records]
        assert accuracy[-1] > 0.2, accuracy  # ten classes: chance is 0.1
        assert "tiny-digits" in coordinator.stdout + coordinator.stderr
    finally:
        codes = stop(processes)
    assert all(code == 0 for code in codes.values()), codes
