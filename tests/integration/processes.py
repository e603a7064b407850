"""Services as real `jetfed` processes on free ports, the way `make run-local` starts
them: start, wait for SERVING over gRPC health, stop with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port

HOST = "127.0.0.1"
WORKERS = {"alice": "0-3", "bob": "4-6", "charlie": "7-9"}
START_TIMEOUT_S = 120.0  # generous: CI runners and shared machines start torch slowly
STOP_TIMEOUT_S = 15.0


@dataclass
class Process:
    name: str
    address: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    workers: Dict[str, Process]
    evaluator: Process

    @property
    def processes(self) -> List[Process]:
        return [*self.workers.values(), self.evaluator]


def jetfed_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "jetfed.cli", *args]


def start(name: str, args: List[str], logs: Path) -> Process:
    port = free_port()
    log = logs / f"{name}.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            jetfed_command(*args, "--host", HOST, "--port", str(port)),
            stdout=handle, stderr=subprocess.STDOUT,
        )
    return Process(name, f"{HOST}:{port}", popen, log)


def wait_serving(process: Process, deadline: float) -> None:
    """Ask the health service until it answers SERVING; fail fast if the process dies."""
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with grpc.insecure_channel(process.address, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.popen.poll() is not None:
                pytest.fail(f"{process.name} exited with {process.popen.returncode}:\n{process.output()}")
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{process.name} not SERVING within {START_TIMEOUT_S:.0f}s:\n{process.output()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=min(left, 1.0), wait_for_ready=True)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                continue
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            return


def stop(processes: List[Process]) -> Dict[str, object]:
    """SIGTERM to all, then each exit status, or "killed" when one ignored the signal."""
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    codes: Dict[str, object] = {}
    for process in processes:
        try:
            codes[process.name] = process.popen.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
            codes[process.name] = f"killed after ignoring SIGTERM for {STOP_TIMEOUT_S:.0f}s"
    return codes
