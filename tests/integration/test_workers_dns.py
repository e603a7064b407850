"""A federation whose workers come from DNS (--workers-dns): three real worker
processes on 127.0.0.1, .2 and .3 (all loopback on Linux), one port, as a headless
Service's pods would be; only the resolver is a stub, at its seam. The third appears in
DNS between rounds and joins; a failed lookup in between keeps the roster."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from coordinator.discovery import Address
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from tests.conftest import free_port
from tests.integration.processes import START_TIMEOUT_S, Process, jetfed_command, stop, wait_serving

BOARDS = {"alice": ("127.0.0.1", "0-4"), "bob": ("127.0.0.2", "5-9"), "charlie": ("127.0.0.3", "all")}
TARGET = "jetfed-workers.jetfed.svc.cluster.local"


def start_on(name: str, host: str, port: int, labels: str, data: Path, logs: Path) -> Process:
    log = logs / f"{name}.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            jetfed_command("worker", "--name", name, "--labels", labels, "--data-dir", str(data), "--no-download",
                           "--threads", "1", "--host", host, "--port", str(port)),
            stdout=handle, stderr=subprocess.STDOUT,
        )
    return Process(name, f"{host}:{port}", popen, log)


class Dns:
    """The resolver seam: the pods' addresses as a headless Service would list them.
    Lookup 1 is the start, 2 comes before round 2 (it fails), 3 before round 3 (charlie
    is ready by then)."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    async def __call__(self, host: str, port: int) -> List[Address]:
        self.calls.append(host)
        if len(self.calls) == 2:
            raise OSError("Temporary failure in name resolution")
        hosts = ["127.0.0.1", "127.0.0.2"] + (["127.0.0.3"] if len(self.calls) >= 3 else [])
        return [(ip, port) for ip in hosts]


def test_workers_named_by_dns_train_and_a_new_one_joins_between_rounds(
    tiny_mnist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    processes = [start_on(name, host, port, labels, tiny_mnist, tmp_path) for name, (host, labels) in BOARDS.items()]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in processes:
            wait_serving(process, deadline)
        settings = RunSettings(
            workers={}, evaluator=None, workers_dns=f"{TARGET}:{port}", out_dir=tmp_path / "run", rounds=4,
            train=TrainConfig(lr=0.1, batch_size=32, max_batches=2, seed=1), round_timeout=60.0,
            connect_timeout=20.0, max_backoff=1.0,
        ).validated()
        dns = Dns()
        lines: List[str] = []
        with caplog.at_level(logging.INFO, logger="coordinator.discovery"):
            summary = asyncio.run(run(settings, say=lines.append, resolve=dns))
    finally:
        codes = stop(processes)
    assert all(code == 0 for code in codes.values()), codes
    assert dns.calls == [TARGET] * 4  # the start, then once before each later round
    assert f"DNS named 2 workers: alice at 127.0.0.1:{port}, bob at 127.0.0.2:{port}" in lines
    joined = f"Worker charlie joined at 127.0.0.3:{port} ({TARGET}:{port})"
    assert lines.index("Training round 2/4") < lines.index(joined) < lines.index("Training round 3/4")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["workers"]) for r in records] == [["alice", "bob"]] * 2 + [["alice", "bob", "charlie"]] * 2
    assert summary.workers == 3 and summary.never_contributed == []
    failed = [r.getMessage() for r in caplog.records if "lookup failed" in r.getMessage()]
    assert failed == [f"workers_dns={TARGET}:{port} lookup failed (Temporary failure in name resolution); the "
                      "workers known so far go on"]
