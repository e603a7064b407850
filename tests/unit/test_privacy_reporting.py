"""Each worker's cumulative DP-SGD epsilon where people look for it: metrics.jsonl (both
drivers), GetStatus/WatchStatus, the progress table and Prometheus (jetfed_dp_epsilon),
and the asynchronous driver's budget stop. The runs are `jetfed simulate`'s in-process
fleet (coordinator/local_fleet.py): real DP-SGD rounds and accountants, no sockets but
the status service's own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import grpc
import pytest

from coordinator.board import RunBoard
from coordinator.federation import Fleet, RunFailed
from coordinator.progress import render
from coordinator.runner import run
from coordinator.status_service import status_message
from jetfed import privacy
from jetfed.telemetry import RunTelemetry
from jetfed.v1 import coordinator_pb2 as pb
from jetfed.v1 import coordinator_pb2_grpc
from tests.conftest import free_port
from tests.unit.test_buffered import fleet_and_settings

pytest.importorskip("opacus")

DP_FLAGS = ("--dp-noise-multiplier", "1.0", "--dp-max-grad-norm", "1.0", "--dp-delta", "1e-5")
NAMES = ("alice", "bob")


def records(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_epsilons(recorded: List[Dict[str, Any]]) -> Dict[str, float]:
    """Each worker's epsilon in the last record it contributed to."""
    last: Dict[str, float] = {}
    for record in recorded:
        last.update(record["privacy"]["epsilon"])
    return last


async def watch(address: str) -> List[pb.RunStatus]:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return [m.status async for m in stub.WatchStatus(pb.WatchStatusRequest(), timeout=120)]


def watched_run(tiny_mnist: Path, tmp_path: Path, *flags: str) -> Tuple[List[pb.RunStatus], RunTelemetry]:
    """A simulated run with these flags, its status service watched from start to end:
    every status it sent, and its Prometheus registry."""
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, *flags,
                                                  "--status-address", f"127.0.0.1:{free_port()}")
    telemetry = RunTelemetry()

    async def scenario() -> List[pb.RunStatus]:
        runner = asyncio.ensure_future(run(settings, say=lambda line: None, telemetry=telemetry, fleet=fleet))
        watcher = asyncio.ensure_future(watch(settings.status_address))
        await runner
        return await asyncio.wait_for(watcher, 30)

    try:
        return asyncio.run(scenario()), telemetry
    finally:
        trainer.close()


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff"])
def test_each_workers_epsilon_reaches_the_records_the_status_and_prometheus(
    tiny_mnist: Path, tmp_path: Path, strategy: str,
) -> None:
    """Synchronous rounds and asynchronous versions alike: every record has each update's
    (epsilon, delta) and the contributors' cumulative epsilons, growing with the rounds a
    worker trains; the last status and jetfed_dp_epsilon say what the last records say."""
    seen, telemetry = watched_run(tiny_mnist, tmp_path, "--strategy", strategy, "--rounds", "3", "--eval-every", "3",
                                  *DP_FLAGS)
    recorded = records(tmp_path / "run")
    assert [r["round"] for r in recorded] == [1, 2, 3]
    trained: Dict[str, List[float]] = {name: [] for name in NAMES}
    for record in recorded:
        spent = record["privacy"]
        assert spent["delta"] == 1e-5
        assert set(spent["epsilon"]) == {u.split("#")[0] for u in record["updates"]}
        assert spent["max_epsilon"] == max(spent["epsilon"].values())
        for key, update in sorted(record["updates"].items()):
            assert update["delta"] == 1e-5 and update["epsilon"] > 0
            trained[key.split("#")[0]].append(update["epsilon"])
            assert update["epsilon"] <= spent["epsilon"][key.split("#")[0]]
    for name, epsilons in trained.items():
        assert epsilons and epsilons == sorted(epsilons) and len(set(epsilons)) == len(epsilons), (name, epsilons)
    last = last_epsilons(recorded)
    assert set(last) == set(NAMES)

    final = seen[-1]
    assert final.state == pb.RUN_STATE_FINISHED
    assert {w.name: (w.epsilon, w.delta) for w in final.workers} == {n: (last[n], 1e-5) for n in NAMES}
    for name in NAMES:
        assert telemetry.registry.get_sample_value("jetfed_dp_epsilon", {"worker": name}) == last[name]


def test_a_run_without_dp_reports_no_epsilon(tiny_mnist: Path, tmp_path: Path) -> None:
    seen, telemetry = watched_run(tiny_mnist, tmp_path, "--rounds", "1")
    assert "privacy" not in records(tmp_path / "run")[0]
    assert all(w.epsilon == 0 and w.delta == 0 for w in seen[-1].workers)
    # The gauge is declared (its HELP in every scrape) but has no worker's sample.
    declared = {family.name: family.samples for family in telemetry.registry.collect()}
    assert declared["jetfed_dp_epsilon"] == []


def test_the_status_message_and_the_progress_table_carry_each_workers_epsilon() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    board = RunBoard.for_workers(5, "/tmp/run", {"alice": "a:1", "bob": "b:1"})

    def table_text() -> str:
        console = Console(width=160, record=True)
        console.print(render(board))
        return console.export_text()

    assert "epsilon" not in table_text()
    board.privacy_spent({"alice": 1.25}, 1e-5)
    message = status_message(board)
    assert [(w.name, w.epsilon, w.delta) for w in message.workers] == [("alice", 1.25, 1e-5), ("bob", 0.0, 0.0)]
    board.privacy_spent({"bob": 0.5, "stranger": 9.0}, 1e-5)  # a name the board does not know is ignored
    board.privacy_spent({"alice": 2.5}, 1e-5)
    assert [(w.epsilon, w.delta) for w in status_message(board).workers] == [(2.5, 1e-5), (0.5, 1e-5)]
    text = table_text()
    assert "epsilon" in text and "2.500" in text and "0.500" in text
    # Through the wire format and back: the fields are the contract's, not an extra.
    again = pb.RunStatus.FromString(status_message(board).SerializeToString())
    assert [w.epsilon for w in again.workers] == [2.5, 0.5]


def budget_for_two_rounds(fleet: Fleet, settings: Any) -> float:
    """A budget that lets every worker train two rounds and none a third."""
    per_worker = []
    for worker in fleet.workers.values():
        spend = privacy.round_spend(1, settings.train, len(worker.data))
        per_worker.append((privacy.epsilon_of([spend] * 2, 1e-5), privacy.epsilon_of([spend] * 3, 1e-5)))
    budget = max(two for two, _ in per_worker) * 1.0001
    assert all(three > budget for _, three in per_worker), per_worker
    return budget


@pytest.mark.parametrize("strategy", ["fedasync"])
def test_an_asynchronous_run_stops_when_every_worker_has_spent_its_budget(
    tiny_mnist: Path, tmp_path: Path, strategy: str,
) -> None:
    """Each worker may train two updates: a worker that refuses is asked no more, and once
    both have refused the run stops at once with the synchronous driver's line, after the
    versions their updates made, none over the budget (not after --round-timeout x
    (--round-retries + 1) = 120 s of silence)."""
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--strategy", strategy, "--rounds", "20",
                                                  *DP_FLAGS, "--round-timeout", "60", "--round-retries", "1")
    budget = budget_for_two_rounds(fleet, settings)
    settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, epsilon_budget=budget))
    started = time.perf_counter()
    try:
        with pytest.raises(RunFailed) as stopped:
            asyncio.run(run(settings, say=lambda line: None, fleet=fleet))
    finally:
        trainer.close()
    assert time.perf_counter() - started < 60
    line = str(stopped.value)
    assert "every worker asked has spent its privacy budget" in line
    assert f"--dp-epsilon-budget {budget:g} at delta 1e-05" in line
    assert line.count("RESOURCE_EXHAUSTED: privacy budget spent") == 2
    recorded = records(tmp_path / "run")
    # Four updates in all (two a worker): two fedbuff versions of two, four fedasync versions of one.
    assert sum(len(r["updates"]) for r in recorded) == 4
    assert len(recorded) == {"fedbuff": 2, "fedasync": 4}[strategy]  # fedbuff: the same driver, buffer_size 2
    assert max(r["privacy"]["max_epsilon"] for r in recorded) <= budget
