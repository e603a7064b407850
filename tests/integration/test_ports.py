"""A port is one service's: gRPC's default SO_REUSEPORT would let a second process bind
a taken port and silently take half its connections."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.processes import HOST, Fleet, jetfed_command


def test_a_worker_on_a_taken_port_exits_naming_it(fleet: Fleet, tiny_mnist: Path) -> None:
    taken = fleet.workers["alice"].address
    argv = jetfed_command("worker", "--name", "mallory", "--labels", "0-3", "--data-dir", str(tiny_mnist),
                          "--no-download", "--threads", "1", "--host", HOST, "--port", taken.rpartition(":")[2])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--port: cannot listen on {taken}: the port is taken by another process" in done.stderr
