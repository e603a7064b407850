"""A hundred workers on real sockets: the real `jetfed coordinator` process drives 100
zero-compute workers of the bench harness (bench/fleet.py: real WorkerService
servicers, one grpc.aio server and loopback port each, all in one process) through
two fedavg rounds that need every one of them.

Each harness worker returns the weights it received plus STEP x (1 + seed % 4), its
seed being the one the worker derives for (run seed, round, name), so the final model
is known in advance: the initial model plus, each round, the mean of the hundred steps
(every worker claims the same examples). It proves that every update crossed the wire
both ways and went into the average once, not merely that a hundred calls returned."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.fleet import STEP, HarnessFleet, worker_name, write_init_weights
from jetfed.training import derive_seed
from tests.integration.processes import jetfed_command

WORKERS = 100
ROUNDS = 2
SEED = 1  # the federation.toml's seed, which every worker's round seed derives from
RUN_TIMEOUT_S = 180.0


def expected_shift() -> float:
    """What the rounds add to every float coordinate: each round's mean step."""
    return sum(
        sum(STEP * (1 + derive_seed(SEED, r, worker_name(i)) % 4) for i in range(WORKERS)) / WORKERS
        for r in range(1, ROUNDS + 1)
    )


def test_hundred_workers_every_update_every_round(tmp_path: Path) -> None:
    init = tmp_path / "init.safetensors"
    write_init_weights(init, "mnist-cnn", seed=SEED)
    started = time.monotonic()
    with HarnessFleet(WORKERS, processes=1, log_dir=tmp_path) as fleet:
        assert len(fleet.addresses) == WORKERS and len(set(fleet.addresses.values())) == WORKERS
        config = fleet.federation_toml(tmp_path / "federation.toml", rounds=ROUNDS, init_weights=init)
        log = tmp_path / "coordinator.log"
        with log.open("wb") as handle:
            done = subprocess.run(
                jetfed_command("coordinator", "--config", str(config), "--out", str(tmp_path / "run")),
                stdout=handle, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S,
            )
    elapsed = time.monotonic() - started
    output = log.read_text(errors="replace")
    assert done.returncode == 0, output[-4000:]
    assert "Run finished: 2 rounds" in output, output[-2000:]

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    names = sorted(worker_name(i) for i in range(WORKERS))
    for record in records:
        assert sorted(record["updates"]) == names, record["round"]
        assert record["attempts"] == 1 and not record["failed"] and not record["late"] and not record["clipped"]
        assert all(u["num_examples"] == 60 for u in record["updates"].values())

    start = load_file(str(init))
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert sorted(final) == sorted(start)
    shift = expected_shift()
    # Measured error 1e-8; one update missing or counted twice moves the mean by over 5e-7.
    for name, tensor in start.items():
        torch.testing.assert_close(final[name], tensor + shift, rtol=0, atol=5e-8, msg=name)
    print(f"{WORKERS} workers, {ROUNDS} rounds: {elapsed:.1f}s with the fleet's start "
          f"({fleet.start_seconds:.1f}s); rounds {[round(r['duration_s'], 2) for r in records]}s")
