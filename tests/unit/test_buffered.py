"""The asynchronous driver on in-process workers (no sockets): versions are made from
buffered updates whose staleness is recorded, and a fleet that cannot make a step ends
the run with the reason instead of waiting for ever."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import List

import pytest

from coordinator import cli as coordinator_cli
from coordinator.clients import Update, Weights
from coordinator.federation import Fleet, RunFailed
from coordinator.local_fleet import ADDRESS, LocalWorker
from coordinator.runner import run
from coordinator.simulate import build_fleet, build_parser
from jetfed.config import TrainConfig
from jetfed.errors import JetfedError


def fleet_and_settings(tiny_mnist: Path, tmp_path: Path, *flags: str):  # type: ignore[no-untyped-def]
    config = tmp_path / "federation.toml"
    config.write_text('[federation]\nseed = 2\n\n[training]\nbatches = 2\nbatch_size = 16\n\n'
                      '[workers.alice]\naddress = "-"\nlabels = "0-4"\n\n[workers.bob]\naddress = "-"\nlabels = "5-9"\n\n'
                      '[evaluator]\naddress = "-"\n')
    fleet, trainer = build_fleet(config, build_parser().parse_args(["--config", str(config), "--data-dir",
                                                                     str(tiny_mnist)]))
    values = coordinator_cli.parse_args(["--config", str(config), "--out", str(tmp_path / "run"), *flags])
    values.update(worker=[(n, ADDRESS) for n in fleet.workers], evaluator=ADDRESS)
    settings = dataclasses.replace(coordinator_cli.settings_from(values), score_updates=False)
    return fleet, trainer, settings


def test_versions_come_from_buffered_updates_with_their_staleness(tiny_mnist: Path, tmp_path: Path) -> None:
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--strategy", "fedbuff", "--rounds", "4",
                                                  "--eval-every", "2")
    lines: List[str] = []
    try:
        summary = asyncio.run(run(settings, say=lines.append, fleet=fleet))
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3, 4]
    assert all(len(r["workers"]) == 2 for r in records)
    for record in records:
        for update in record["updates"].values():
            assert update["base_version"] + update["staleness"] == record["version"] - 1
            assert update["pace"] > 0
    assert [r["version"] for r in records if "evaluation" in r] == [1, 3, 4]
    assert summary.final_score is not None
    assert any(line.startswith("Training asynchronously with fedbuff") for line in lines)


class Refusing(LocalWorker):
    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        raise JetfedError("refused by the test")


def test_a_fleet_that_makes_no_step_ends_the_run_with_the_reason(tiny_mnist: Path, tmp_path: Path) -> None:
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--strategy", "fedbuff", "--rounds", "3",
                                                  "--round-timeout", "1", "--round-retries", "0")
    refusing = {name: Refusing(name, w._trainer, w.data) for name, w in fleet.workers.items()}
    try:
        with pytest.raises(RunFailed, match=r"no server step for 1s .* refused by the test"):
            asyncio.run(run(settings, say=lambda line: None, fleet=Fleet(refusing, fleet.evaluator)))
    finally:
        trainer.close()


class Counted(LocalWorker):
    """Counts the Train calls in flight across the fleet (shared list: [now, most])."""

    def __init__(self, name, trainer, data, gauge: List[int]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(name, trainer, data)
        self.gauge = gauge

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        self.gauge[0] += 1
        self.gauge[1] = max(self.gauge[1], self.gauge[0])
        try:
            await asyncio.sleep(0.01)  # every loop gets to ask for its turn meanwhile
            return await super().train(round_number, config, weights, timeout)
        finally:
            self.gauge[0] -= 1


@pytest.mark.parametrize("bound, most", [(1, 1), (0, 2)])
def test_max_concurrency_bounds_the_workers_training_at_once(tiny_mnist: Path, tmp_path: Path, bound: int,
                                                             most: int) -> None:
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--strategy", "fedbuff", "--strategy-param", "buffer_size=1",
                                                  "--rounds", "6", "--max-concurrency", str(bound))
    gauge = [0, 0]
    counted = {name: Counted(name, w._trainer, w.data, gauge) for name, w in fleet.workers.items()}
    try:
        asyncio.run(run(settings, say=lambda line: None, fleet=Fleet(counted, fleet.evaluator)))
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert gauge[1] == most
    assert {w for r in records for w in r["workers"]} == {"alice", "bob"}  # each got its turn
