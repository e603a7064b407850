"""What an operator sees with grpcurl against real worker and evaluator processes:
reflection lists and describes the services, health answers, GetInfo prints JSON."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from tests.integration.processes import Fleet


def call(grpcurl: str, address: str, *verb: str, data: Optional[dict] = None) -> str:
    """`grpcurl -plaintext [-d JSON] ADDRESS VERB...`; its stdout, once it exits 0."""
    flags = ["-d", json.dumps(data)] if data is not None else []
    done = subprocess.run([grpcurl, "-plaintext", *flags, address, *verb], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list_shows_the_worker_and_health(grpcurl: str, fleet: Fleet) -> None:
    services = call(grpcurl, fleet.workers["alice"].address, "list").split()
    assert {"jetfed.v1.Worker", "grpc.health.v1.Health"} <= set(services)
    assert "jetfed.v1.Evaluator" not in services


def test_list_shows_the_evaluator_and_health(grpcurl: str, fleet: Fleet) -> None:
    services = call(grpcurl, fleet.evaluator.address, "list").split()
    assert {"jetfed.v1.Evaluator", "grpc.health.v1.Health"} <= set(services)
    assert "jetfed.v1.Worker" not in services


def test_describe_worker_shows_its_rpcs(grpcurl: str, fleet: Fleet) -> None:
    text = call(grpcurl, fleet.workers["alice"].address, "describe", "jetfed.v1.Worker")
    assert re.search(r"rpc Train \( stream \.jetfed\.v1\.TrainRequest \) returns \( stream \.jetfed\.v1\.TrainResponse \)", text), text
    assert re.search(r"rpc Evaluate \( stream \.jetfed\.v1\.EvaluateRequest \) returns \( \.jetfed\.v1\.EvaluateResponse \)", text), text
    assert re.search(r"rpc GetInfo \( \.jetfed\.v1\.GetInfoRequest \) returns \( \.jetfed\.v1\.GetInfoResponse \)", text), text
    assert re.search(r"rpc EndRun \( \.jetfed\.v1\.EndRunRequest \) returns \( \.jetfed\.v1\.EndRunResponse \)", text), text


def test_describe_train_header_shows_its_fields(grpcurl: str, fleet: Fleet) -> None:
    text = call(grpcurl, fleet.workers["alice"].address, "describe", "jetfed.v1.TrainHeader")
    assert "uint64 round = 1;" in text
    assert ".jetfed.v1.TrainConfig config = 2;" in text
    assert ".jetfed.v1.WeightManifest manifest = 3;" in text
    assert "string run_id = 4;" in text


@pytest.mark.parametrize("service", ["", "jetfed.v1.Worker"])
def test_health_check_is_serving(grpcurl: str, fleet: Fleet, service: str) -> None:
    reply = call(grpcurl, fleet.workers["bob"].address, "grpc.health.v1.Health/Check", data={"service": service})
    assert json.loads(reply) == {"status": "SERVING"}


def test_worker_get_info_prints_json(grpcurl: str, fleet: Fleet) -> None:
    info = json.loads(call(grpcurl, fleet.workers["charlie"].address, "jetfed.v1.Worker/GetInfo"))
    assert (info["name"], info["role"], info["model"], info["device"]) == ("charlie", "worker", "mnist-cnn", "cpu")
    # grpcurl keeps the proto field names and, like protobuf's JSON mapping, quotes uint64
    assert info["label_counts"] == ["0"] * 7 + ["60"] * 3
    assert info["dataset_size"] == "180"


def test_evaluator_get_info_prints_json(grpcurl: str, fleet: Fleet) -> None:
    info = json.loads(call(grpcurl, fleet.evaluator.address, "jetfed.v1.Evaluator/GetInfo"))
    assert (info["name"], info["role"]) == ("testing", "evaluator")
    assert info["dataset_size"] == "200"


def test_status_recipes_follow_a_coordinator_run(grpcurl: str, fleet: Fleet, tmp_path: Path) -> None:
    from tests.conftest import free_port
    from tests.integration.processes import jetfed_command

    status = f"127.0.0.1:{free_port()}"
    args = ["coordinator", "--out", str(tmp_path), "--rounds", "30", "--batches", "2", "--eval-every", "100",
            "--status-address", status, f"--evaluator=testing={fleet.evaluator.address}"]
    args += [f"--worker={name}={p.address}" for name, p in fleet.workers.items()]
    run = subprocess.Popen(jetfed_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in run.stdout:
            if line.startswith("Training round 3/"):
                break
        mid = json.loads(call(grpcurl, status, "jetfed.v1.Coordinator/GetStatus"))["status"]
        assert mid["state"] == "RUN_STATE_RUNNING" and mid["rounds"] == 30
        assert [w["name"] for w in mid["workers"]] == ["alice", "bob", "charlie"]
        watched = call(grpcurl, status, "jetfed.v1.Coordinator/WatchStatus")
        assert '"state": "RUN_STATE_FINISHED"' in watched and '"round": 30' in watched
    finally:
        output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output
