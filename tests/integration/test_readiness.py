"""sd_notify against a real worker process: systemd's side is a unix datagram socket,
so the test plays systemd with one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.integration.processes import HOST, jetfed_command


def test_worker_tells_systemd_when_it_serves_and_when_it_stops(tiny_mnist: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(120)
        port = free_port()
        worker = subprocess.Popen(
            jetfed_command("worker", "--name", "alice", "--labels", "0-3", "--data-dir", str(tiny_mnist),
                           "--no-download", "--threads", "1", "--host", HOST, "--port", str(port)),
            env={**os.environ, "NOTIFY_SOCKET": path}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            assert systemd.recv(64) == b"READY=1"
            with grpc.insecure_channel(f"{HOST}:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, "READY=1 came before the port served"
            worker.send_signal(signal.SIGTERM)
            assert systemd.recv(64) == b"STOPPING=1"
            assert worker.wait(30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.communicate()
