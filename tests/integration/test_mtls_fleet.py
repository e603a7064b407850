"""Mutual TLS across real processes: workers and the evaluator provisioned by
`jetfed certs` accept the coordinator's certificate end to end and refuse everyone else."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.conftest import free_port
from tests.integration.processes import HOST, START_TIMEOUT_S, Process, jetfed_command, stop

NODES = {"alice": "0-3", "bob": "4-6"}


def tls_flags(folder: Path, node: str) -> List[str]:
    return ["--tls-cert", str(folder / node / f"{node}.crt"), "--tls-key", str(folder / node / f"{node}.key"),
            "--tls-ca", str(folder / node / "ca.crt")]


def grpcurl_tls(pki: Path, folder: Path, node: str) -> List[str]:
    """grpcurl flags that trust the federation's CA in `pki` and present `node`'s
    certificate from `folder` (the same federation, or a stranger's)."""
    return ["-cacert", str(pki / "ca.crt"), "-cert", str(folder / node / f"{node}.crt"),
            "-key", str(folder / node / f"{node}.key")]


def provision(folder: Path) -> None:
    args = ["certs", "--out", str(folder), "--coordinator", "coord", "--evaluator", "testing"]
    args += [arg for node in NODES for arg in ("--worker", node)]
    subprocess.run(jetfed_command(*args), check=True, capture_output=True)


def started(name: str, args: List[str], logs: Path) -> Process:
    port = free_port()
    log = logs / f"{name}.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(jetfed_command(*args, "--host", HOST, "--port", str(port)),
                                 stdout=handle, stderr=subprocess.STDOUT)
    return Process(name, f"localhost:{port}", popen, log)


def wait_listening(process: Process) -> None:
    """The services speak only TLS now, so wait for the log line rather than a health call."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while "listening on" not in process.output():
        assert process.popen.poll() is None, process.output()
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def secure_fleet(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, object]]:
    folder = tmp_path_factory.mktemp("pki")
    provision(folder)
    common = ["--data-dir", str(tiny_mnist), "--no-download", "--threads", "1"]
    processes = [started(name, ["worker", "--name", name, "--labels", labels, *common, *tls_flags(folder, name)], folder)
                 for name, labels in NODES.items()]
    processes.append(started("testing", ["evaluator", "--name", "testing", *common, *tls_flags(folder, "testing")], folder))
    try:
        for process in processes:
            wait_listening(process)
        yield {"pki": folder, "processes": processes}
    finally:
        stop(processes)


def coordinate(fleet: Dict[str, object], out: Path, *security: str) -> subprocess.CompletedProcess:
    processes = fleet["processes"]
    args = ["coordinator", "--out", str(out), "--rounds", "2", "--batches", "2", "--connect-timeout", "5",
            "--round-retries", "0", "--min-workers", "2", *security]
    args += [f"--worker={p.name}={p.address}" for p in processes[:-1]]
    args += [f"--evaluator=testing={processes[-1].address}"]
    return subprocess.run(jetfed_command(*args), capture_output=True, text=True, timeout=120)


def test_coordinator_certificate_runs_the_federation(secure_fleet, tmp_path):
    done = coordinate(secure_fleet, tmp_path, *tls_flags(secure_fleet["pki"], "coord"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Federated model: Average loss" in done.stdout


def test_worker_certificate_may_not_train(secure_fleet, tmp_path):
    done = coordinate(secure_fleet, tmp_path, *tls_flags(secure_fleet["pki"], "alice"))
    assert done.returncode != 0
    assert "PERMISSION_DENIED" in done.stderr


def test_plaintext_coordinator_is_refused(secure_fleet, tmp_path):
    done = coordinate(secure_fleet, tmp_path)
    assert done.returncode != 0
    assert "none of the 2 workers answered" in done.stderr


def test_certificate_from_another_ca_is_refused(secure_fleet, tmp_path):
    stranger = tmp_path / "other-pki"
    provision(stranger)
    done = coordinate(secure_fleet, tmp_path / "run", *tls_flags(stranger, "coord"))
    assert done.returncode != 0
    assert "none of the 2 workers answered" in done.stderr


def test_grpcurl_recipe_with_a_federation_certificate(secure_fleet, grpcurl):
    pki, alice = secure_fleet["pki"], secure_fleet["processes"][0]
    done = subprocess.run([grpcurl, *grpcurl_tls(pki, pki, "alice"), alice.address, "grpc.health.v1.Health/Check"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
    plain = subprocess.run([grpcurl, "-plaintext", alice.address, "grpc.health.v1.Health/Check"],
                           capture_output=True, text=True, timeout=30)
    assert plain.returncode != 0


# 25 s, left to make test-all: the status service serves with the same TlsFiles as every
# service, whose mutual TLS the tests above check in make test.
@pytest.mark.slow
def test_status_service_speaks_mutual_tls(secure_fleet, grpcurl, tmp_path):
    """With TLS on, GetStatus answers a federation certificate mid-run and refuses a
    plaintext client and a client certificate from another CA."""
    pki, processes = secure_fleet["pki"], secure_fleet["processes"]
    stranger = tmp_path / "other-pki"
    provision(stranger)
    status = f"localhost:{free_port()}"
    args = ["coordinator", "--out", str(tmp_path / "run"), "--rounds", "100000", "--batches", "1",
            "--eval-every", "1000000", "--status-address", status, *tls_flags(pki, "coord")]
    args += [f"--worker={p.name}={p.address}" for p in processes[:-1]]
    run = subprocess.Popen(jetfed_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def get_status(*security: str) -> subprocess.CompletedProcess:
        return subprocess.run([grpcurl, "-max-time", "10", *security, status, "jetfed.v1.Coordinator/GetStatus"],
                              capture_output=True, text=True, timeout=30)

    try:
        for line in run.stdout:
            if line.startswith("Training round 3/"):
                break
        member = get_status(*grpcurl_tls(pki, pki, "alice"))
        assert member.returncode == 0, member.stderr
        assert json.loads(member.stdout)["status"]["state"] == "RUN_STATE_RUNNING"
        assert get_status("-plaintext").returncode != 0
        assert get_status(*grpcurl_tls(pki, stranger, "alice")).returncode != 0
        assert get_status(*grpcurl_tls(pki, pki, "alice")).returncode == 0, "the refusals must not have stopped the service"
    finally:
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=60)
    assert run.returncode == 0, output
