"""`make run-local`'s launcher on real MNIST: the reference federation end to end, and
no process left behind when the run ends or is interrupted."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "tools" / "run_local.py"


def free_port_block(count: int) -> int:
    """A base port whose `count` successors are all free right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65536 and all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def nothing_listens(port: int) -> bool:
    """After a run: no process of ours may still accept connections here (a bind test
    would also trip over the run's connections lingering in TIME_WAIT)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def launch(real_mnist: Path, out: Path, rounds: int, base: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--data-dir", str(real_mnist), "--rounds", str(rounds),
         "--out", str(out), "--base-port", str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_reference_run_reaches_95_percent(real_mnist: Path, tmp_path: Path) -> None:
    base = free_port_block(5)
    proc = launch(real_mnist, tmp_path, 40, base)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, 41))
    assert all(r["workers"] == ["alice", "bob", "charlie"] for r in records)
    assert [r["round"] for r in records if "evaluation" in r] == [1, 11, 21, 31, 40]
    final = records[-1]["evaluation"]["global"]
    assert final["total"] == 10000
    assert final["accuracy"] >= 0.95, output
    assert "MNIST train set on alice: 0: 5923, 1: 6742, 2: 5958, 3: 6131, 4: 0" in output
    assert "total 24754" in output and "total 17181" in output and "total 18065" in output
    assert f"Federated model: Average loss: {final['loss']:.4f}, Accuracy: {final['correct']}/10000" in output
    assert (tmp_path / "model.safetensors").is_file()
    assert all(nothing_listens(base + i) for i in range(5)), "a service outlived run-local"


@pytest.mark.slow  # ~50 s: run-local started and interrupted; each service's own signal handling is tested alone
def test_interrupt_stops_every_service(real_mnist: Path, tmp_path: Path) -> None:
    base = free_port_block(5)
    proc = launch(real_mnist, tmp_path, 40, base)
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("Training round 2/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert all(nothing_listens(base + i) for i in range(5)), "a service outlived an interrupted run-local"


@pytest.mark.slow  # a minute; mutual TLS of every service is tests/integration/test_mtls_fleet.py's
def test_run_local_over_mutual_tls(real_mnist: Path, tmp_path: Path) -> None:
    base = free_port_block(5)
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--data-dir", str(real_mnist), "--rounds", "2", "--out", str(tmp_path),
         "--base-port", str(base), "--tls"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert (tmp_path / "pki" / "ca.crt").is_file()
    for node in ("alice", "bob", "charlie", "testing"):
        assert "tls=on" in (tmp_path / "logs" / f"{node}.log").read_text()
    assert [json.loads(line)["workers"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [["alice", "bob", "charlie"]] * 2
