"""A federation whose workers come from DNS (--workers-dns): three real worker
processes on 127.0.0.1, .2 and .3 (all loopback on Linux), one port, as a headless
Service's pods would be; only the resolver is a stub, at its seam. The third appears in
DNS between rounds and joins; a failed lookup in between keeps the roster. The same
three processes serve an asynchronous run too, where a worker found after a server step
starts training at once."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from coordinator.discovery import Address
from coordinator.runner import run
from coordinator.settings import RunSettings
from coordinator.strategies.registry import StrategySpec
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


@pytest.fixture(scope="module")
def boards(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The three worker processes on one port; yields the port."""
    port, logs = free_port(), tmp_path_factory.mktemp("boards")
    processes = [start_on(name, host, port, labels, tiny_mnist, logs) for name, (host, labels) in BOARDS.items()]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in processes:
            wait_serving(process, deadline)
        yield port
    finally:
        codes = stop(processes)
    assert all(code == 0 for code in codes.values()), codes


def settings_for(port: int, out: Path, **changes: Any) -> RunSettings:
    values: Dict[str, Any] = dict(
        workers={}, evaluator=None, workers_dns=f"{TARGET}:{port}", out_dir=out, rounds=4,
        train=TrainConfig(lr=0.1, batch_size=32, max_batches=2, seed=1), round_timeout=60.0,
        connect_timeout=20.0, max_backoff=1.0,
    )
    return RunSettings(**{**values, **changes}).validated()


def test_workers_named_by_dns_train_and_a_new_one_joins_between_rounds(
    boards: int, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    port = boards
    settings = settings_for(port, tmp_path / "run")
    dns = Dns()
    lines: List[str] = []
    with caplog.at_level(logging.INFO, logger="coordinator.discovery"):
        summary = asyncio.run(run(settings, say=lines.append, resolve=dns))
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


def test_an_asynchronous_run_takes_a_worker_dns_names_after_a_step(boards: int, tmp_path: Path) -> None:
    port = boards
    settings = settings_for(port, tmp_path / "run", rounds=8, max_concurrency=2,
                            strategy=StrategySpec("fedbuff", {"buffer_size": 2}))
    dns = Dns()  # lookup 1 at the start, 2 after version 1 (fails), 3 after version 2 names charlie
    lines: List[str] = []
    summary = asyncio.run(run(settings, say=lines.append, resolve=dns))
    joined = f"Worker charlie joined at 127.0.0.3:{port} ({TARGET}:{port})"
    assert joined in lines
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == list(range(1, 9))
    assert all("charlie" not in r["workers"] for r in records[:2])
    assert any("charlie" in r["workers"] for r in records)
    assert summary.workers == 3 and summary.never_contributed == []
    assert len(dns.calls) >= 3
