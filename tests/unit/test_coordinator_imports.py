"""The coordinator needs no task code: it runs on a machine without the user's task
package, torchvision or a GPU, so none of the modules that build models or load data
may be imported by it, even indirectly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK_CODE = ("jetfed.models", "jetfed.tasks", "jetfed.training", "jetfed.data", "torchvision")
PROBE = (
    "import json, sys\n"
    "import coordinator.cli, coordinator.federation, coordinator.runner\n"
    "print(json.dumps(sorted(sys.modules)))\n"
)


def imported_by_the_coordinator() -> list:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_coordinator_imports_no_task_model_or_data_code() -> None:
    modules = imported_by_the_coordinator()
    assert "coordinator.federation" in modules  # the probe saw the coordinator at all
    loaded = [m for m in modules if any(m == name or m.startswith(name + ".") for name in TASK_CODE)]
    assert loaded == []
