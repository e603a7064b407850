"""Secure aggregation for real: the session's worker processes and a harness worker
(tests/integration/secagg_mallory.py, a real `jetfed worker` process whose secure side
misbehaves on demand) over real gRPC. A secure run equals the plain run within the
fixed-point step; a worker killed between its masked reply and the unmask leaves the
round to the others; garbage is refused without the coordinator crashing; a worker
older than secure aggregation is refused at start-up, never trained in the clear."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from safetensors.torch import load_file

from coordinator.federation import RunFailed
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from tests.conftest import free_port
from tests.integration.processes import HOST, START_TIMEOUT_S, Fleet, Process, stop, wait_serving

TRAIN = TrainConfig(lr=0.1, batch_size=32, max_batches=4, seed=1)
# One round's difference between a secure and a plain mean, per coordinate: each of 3
# workers' weight x delta and weight round to 2^-26 (clip 1, scale 2^25 for 3 workers),
# over a weight sum near 1, plus float32 rounding of the new model; the second round
# trains from models that close. Measured: ~1e-7.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def mallory(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """The harness worker, on charlie's labels; its mode file is set by each test."""
    folder = tmp_path_factory.mktemp("mallory")
    port = free_port()
    log = folder / "mallory.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.secagg_mallory", str(folder / "mode"), "worker",
             "--name", "mallory", "--labels", "7-9", "--data-dir", str(tiny_mnist), "--no-download",
             "--threads", "1", "--state-dir", str(folder / "state"), "--host", HOST, "--port", str(port)],
            stdout=handle, stderr=subprocess.STDOUT)
    process = Process("mallory", f"{HOST}:{port}", popen, log)
    try:
        wait_serving(process, time.monotonic() + START_TIMEOUT_S)
        yield process
    finally:
        stop([process])


def set_mode(process: Process, mode: str) -> None:
    Path(process.popen.args[3]).write_text(mode)


def settings_for(workers: Dict[str, str], out: Path, secure: bool, rounds: int = 2, **fields: Any) -> RunSettings:
    return RunSettings(
        workers=workers, evaluator=None, out_dir=out, rounds=rounds, eval_every=rounds, train=TRAIN,
        round_retries=0, round_timeout=60.0, connect_timeout=30.0, secure_aggregation=secure, **fields,
    ).validated()


def records(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fleet_of(fleet: Fleet, **extra: Process) -> Dict[str, str]:
    names = {n: p.address for n, p in fleet.workers.items()}
    for name, process in extra.items():
        names.pop("charlie")
        names[name] = process.address
    return names


def test_a_secure_run_equals_the_plain_run(fleet: Fleet, tmp_path: Path) -> None:
    workers = fleet_of(fleet)
    asyncio.run(run(settings_for(workers, tmp_path / "plain", secure=False), say=lambda line: None))
    asyncio.run(run(settings_for(workers, tmp_path / "secure", secure=True), say=lambda line: None))
    plain, secure = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "secure" / "model.safetensors")
    assert plain.keys() == secure.keys()
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
    assert 0 < worst <= TOLERANCE  # 0 would mean the secure path never ran
    for record in records(tmp_path / "secure"):
        note = record["secure_aggregation"]
        assert sorted(note["survivors"]) == sorted(workers) and note["dropped"] == []
        assert "delta_norm" not in record["updates"]["alice"]  # never seen one by one
    assert "secure_aggregation" not in records(tmp_path / "plain")[0]


def test_a_worker_older_than_secure_aggregation_is_refused_at_start(fleet: Fleet, mallory: Process,
                                                                    tmp_path: Path) -> None:
    set_mode(mallory, "old")
    with pytest.raises(RunFailed, match="worker mallory does not support secure aggregation"):
        asyncio.run(run(settings_for(fleet_of(fleet, mallory=mallory), tmp_path, secure=True), say=lambda line: None))
    assert "train round" not in mallory.output()


def test_garbage_shares_drop_the_sender_and_the_round_completes(fleet: Fleet, mallory: Process,
                                                                tmp_path: Path) -> None:
    set_mode(mallory, "garbage-shares")
    asyncio.run(run(settings_for(fleet_of(fleet, mallory=mallory), tmp_path, secure=True, rounds=1, min_workers=2),
                    say=lambda line: None))
    (record,) = records(tmp_path)
    assert record["secure_aggregation"]["dropped"] == ["mallory"]  # its mask key rebuilt by the others
    assert sorted(record["workers"]) == ["alice", "bob"]
    assert "self-mask share" in record["failed"]["mallory"]


def test_a_garbage_vector_gets_the_round_refused_not_applied(fleet: Fleet, mallory: Process, tmp_path: Path) -> None:
    set_mode(mallory, "garbage-vector")
    lines: List[str] = []
    with pytest.raises(RunFailed, match="round 1: 0 updates"):
        asyncio.run(run(settings_for(fleet_of(fleet, mallory=mallory), tmp_path, secure=True, rounds=1),
                        say=lines.append))
    assert any("AggregateOutOfRange" in line or "exceed" in line for line in lines), lines
    assert not (tmp_path / "model.safetensors").exists()


def test_self_mask_shares_that_do_not_open_get_the_round_refused(fleet: Fleet, mallory: Process,
                                                                  tmp_path: Path) -> None:
    """Well-addressed garbage: the holders refuse to open them, too few answer the
    unmask, and the round is refused with nothing revealed (bounded, not survived)."""
    set_mode(mallory, "garbage-ciphertext")
    lines: List[str] = []
    with pytest.raises(RunFailed, match="round 1: 0 updates"):
        asyncio.run(run(settings_for(fleet_of(fleet, mallory=mallory), tmp_path, secure=True, rounds=1),
                        say=lines.append))
    assert any("secure aggregation refused the round" in line and "unmask responses, fewer than the threshold"
               in line for line in lines), lines


def test_a_worker_killed_between_masking_and_unmask_leaves_the_round_to_the_others(
        fleet: Fleet, mallory: Process, tmp_path: Path) -> None:
    """Last in the module: mallory is gone afterwards."""
    set_mode(mallory, "die-at-unmask")
    asyncio.run(run(settings_for(fleet_of(fleet, mallory=mallory), tmp_path, secure=True, min_workers=2),
                    say=lambda line: None))
    assert mallory.popen.wait(5) == -9
    first, second = records(tmp_path)
    # Round 1: mallory's masked input arrived, so it is in the sum; its self-mask came
    # off through alice's and bob's shares although it never answered the unmask.
    assert sorted(first["secure_aggregation"]["survivors"]) == ["alice", "bob", "mallory"]
    assert list(first["secure_aggregation"]["unmask_failed"]) == ["mallory"]
    # Round 2 goes on with the other two.
    assert sorted(second["secure_aggregation"]["participants"]) == ["alice", "bob"]
    assert sorted(second["workers"]) == ["alice", "bob"] and "mallory" in second["failed"]
