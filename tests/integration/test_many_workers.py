"""A hundred workers on real sockets: the real `jetfed coordinator` process drives 100
zero-compute workers of the bench harness (bench/fleet.py: real WorkerService
servicers, one grpc.aio server and loopback port each, all in one process) through
two fedavg rounds that need every one of them.

Each harness worker returns the weights it received plus STEP x (1 + seed % 4), its
seed being the one the worker derives for (run seed, round, name), so the final model
is known in advance: the initial model plus, each round, the mean of the hundred steps
(every worker claims the same examples). It proves that every update crossed the wire
both ways and went into the average once, not merely that a hundred calls returned.

The run has --max-concurrency 10, so its rounds stream (each update folded as it
arrives) and the coordinator keeps no idle connection: the TCP connections it holds to
the fleet are counted from /proc while it runs, and after the fleet is ready they never
outnumber the bound (without WorkerClient.release all hundred stay open)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Set

import torch
from safetensors.torch import load_file

from bench.fleet import STEP, HarnessFleet, worker_name, write_init_weights
from jetfed.training import derive_seed
from tests.integration.processes import jetfed_command

WORKERS = 100
ROUNDS = 2
SEED = 1  # the federation.toml's seed, which every worker's round seed derives from
RUN_TIMEOUT_S = 180.0
BOUND = 10  # --max-concurrency
SLACK = 5


def open_connections(pid: int, ports: Set[int]) -> int:
    """ESTABLISHED TCP connections of process `pid` to any of `ports` (its sockets'
    inodes from /proc/PID/fd, matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        found = re.fullmatch(r"socket:\[(\d+)\]", target)
        if found:
            inodes.add(found.group(1))
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and fields[9] in inodes and remote_port in ports:
                count += 1
    return count


class ConnectionCounter(threading.Thread):
    """Samples open_connections every 20 ms, into `counts`, from when `watch` is set
    until `metrics` holds every round's record (EndRun then tells every worker at once)."""

    def __init__(self, pid: int, ports: Set[int], metrics: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.ports, self.metrics = pid, ports, metrics
        self.watch, self.stop = threading.Event(), threading.Event()
        self.counts: List[int] = []

    def run(self) -> None:
        while not self.stop.wait(0.02):
            if not self.watch.is_set():
                continue
            if self.metrics.exists() and len(self.metrics.read_text().splitlines()) >= ROUNDS:
                return
            try:
                self.counts.append(open_connections(self.pid, self.ports))
            except OSError:  # the process has exited
                return


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
        ports = {int(address.rsplit(":", 1)[1]) for address in fleet.addresses.values()}
        coordinator = subprocess.Popen(
            jetfed_command("coordinator", "--config", str(config), "--out", str(tmp_path / "run"),
                           "--max-concurrency", str(BOUND)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        counter = ConnectionCounter(coordinator.pid, ports, tmp_path / "run" / "metrics.jsonl")
        counter.start()
        watchdog = threading.Timer(RUN_TIMEOUT_S, coordinator.kill)  # a hung run fails, never hangs
        watchdog.start()
        lines = []
        try:
            assert coordinator.stdout is not None
            for line in coordinator.stdout:
                lines.append(line)
                if line.startswith("Training round 1/"):  # the fleet is ready: released
                    counter.watch.set()
            coordinator.wait(RUN_TIMEOUT_S)
        finally:
            watchdog.cancel()
            counter.stop.set()
            if coordinator.poll() is None:
                coordinator.kill()
        counter.join()
    output = "".join(lines)
    assert coordinator.returncode == 0, output[-4000:]
    elapsed = time.monotonic() - started
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
    # Sampled through both rounds; all 100 would be open after round 1 without release.
    # A closed channel's socket goes on gRPC's own thread a moment later: SLACK of them.
    assert len(counter.counts) >= 10 and max(counter.counts) <= BOUND + SLACK, str(counter.counts)
    print(f"open connections sampled: max {max(counter.counts)} of {len(counter.counts)} samples")
    print(f"{WORKERS} workers, {ROUNDS} rounds: {elapsed:.1f}s with the fleet's start "
          f"({fleet.start_seconds:.1f}s); rounds {[round(r['duration_s'], 2) for r in records]}s")
