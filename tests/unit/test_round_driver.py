"""The synchronous driver on in-process workers (no sockets): a round's evaluation runs
beside the next round's training, yet each round is committed in order with its own
scores and the console reads as if every evaluation had ended before the next round."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import List, Tuple

from coordinator.clients import Score, Weights
from coordinator.federation import Fleet
from coordinator.local_fleet import LocalEvaluator, LocalWorker
from coordinator.rounds import Console, lag_bound
from coordinator.runner import run
from jetfed.config import TrainConfig
from tests.unit.test_buffered import fleet_and_settings


class Trains:
    """Round numbers as the workers start them, and an event per round."""

    def __init__(self) -> None:
        self.started: List[int] = []
        self.events: dict = {}

    def event(self, number: int) -> asyncio.Event:
        return self.events.setdefault(number, asyncio.Event())


class Noting(LocalWorker):
    trains: Trains

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float):  # type: ignore[no-untyped-def]
        self.trains.started.append(round_number)
        self.trains.event(round_number).set()
        return await super().train(round_number, config, weights, timeout)


class WaitsForTheNextRound(LocalEvaluator):
    """Scores round r's models only once round r+1's training has started: were the
    evaluation on the critical path, the run would never end (the test times out)."""

    trains: Trains
    scored: List[Tuple[int, int]]
    waiting: List[int]

    async def evaluate(self, tag: str, weights: Weights, timeout: float) -> Score:
        round_number = len(self.scored) + len(self.waiting) + 1  # one model a round, asked in round order
        self.waiting.append(round_number)
        if round_number < 3:
            await asyncio.wait_for(self.trains.event(round_number + 1).wait(), 60)
        self.waiting.remove(round_number)
        self.scored.append((round_number, max(self.trains.started)))
        return await super().evaluate(tag, weights, timeout)


def test_a_round_is_scored_while_the_next_trains_and_committed_in_order(tiny_mnist: Path, tmp_path: Path) -> None:
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--rounds", "3", "--eval-every", "1")
    trains = Trains()
    workers = {}
    for name, worker in fleet.workers.items():
        workers[name] = Noting(name, worker._trainer, worker.data)
        workers[name].trains = trains
    evaluator = WaitsForTheNextRound(fleet.evaluator.name, trainer, fleet.evaluator.data)
    evaluator.trains, evaluator.scored, evaluator.waiting = trains, [], []
    lines: List[str] = []
    try:
        summary = asyncio.run(asyncio.wait_for(run(settings, say=lines.append, fleet=Fleet(workers, evaluator)), 120))
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all("evaluation" in r and "evaluation_error" not in r for r in records)
    assert sorted(scored for scored, _ in evaluator.scored) == [1, 2, 3]
    assert all(training > scored for scored, training in evaluator.scored[:2]), "the next round trains meanwhile"
    assert summary.final_score is not None
    assert records[-1]["evaluation"]["global"]["accuracy"] == summary.final_score.accuracy
    # The console as a run that waited for each evaluation prints it.
    shown = [line.split(":")[0] for line in lines if line.startswith(("Training round", "Evaluating", "Federated"))]
    collapsed = [kind for i, kind in enumerate(shown) if i == 0 or kind != shown[i - 1]]
    assert collapsed == [line for number in (1, 2, 3)
                         for line in (f"Training round {number}/3", "Evaluating models", "Federated model")]
    # The checkpoint holds the last round, committed after its evaluation.
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 3 and "evaluation" in state["record"]


def test_lines_said_during_an_evaluation_wait_behind_its_lines() -> None:
    printed: List[str] = []
    console = Console(printed.append)
    console.say("Training round 1/3")
    console.hold(1)
    console.say("Training round 2/3")
    console.hold(2)
    console.say("Training round 3/3")
    assert printed == ["Training round 1/3"]
    console.release(1, ["Evaluating models", "score 1"])
    assert printed[1:] == ["Evaluating models", "score 1", "Training round 2/3"]
    console.release(2, ["Evaluating models", "score 2"])
    console.say("Run finished")
    assert printed[4:] == ["Evaluating models", "score 2", "Training round 3/3", "Run finished"]


def test_rounds_waiting_for_an_evaluation_are_bounded_by_model_bytes() -> None:
    assert lag_bound(1_724_920) == 38  # mnist-cnn
    assert lag_bound(44_750_000) == 2  # resnet18: the round scored and the one after it
    assert lag_bound(0) >= 2


class SeesTheCheckpoint(LocalWorker):
    """Records, as each round's training starts, the round the checkpoint holds."""

    seen: List[Tuple[int, int]]
    folder: Path

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float):  # type: ignore[no-untyped-def]
        state = self.folder / "state.json"
        self.seen.append((round_number, json.loads(state.read_text())["round"] if state.exists() else 0))
        return await super().train(round_number, config, weights, timeout)


def test_a_strategy_whose_workers_keep_state_trains_a_round_only_after_the_last_is_checkpointed(
        tiny_mnist: Path, tmp_path: Path) -> None:
    """SCAFFOLD's workers keep c_i of their last rounds only: a round trained before the
    one before it is checkpointed could, after a crash, be asked again of a worker that
    has pruned the c_i it needs."""
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--rounds", "3", "--eval-every", "1",
                                                  "--strategy", "scaffold", "--min-workers", "2")
    seen: List[Tuple[int, int]] = []
    workers = {}
    for name, worker in fleet.workers.items():
        workers[name] = SeesTheCheckpoint(name, worker._trainer, worker.data)
        workers[name].seen, workers[name].folder = seen, tmp_path / "run" / "checkpoint"
    try:
        asyncio.run(asyncio.wait_for(run(settings, say=lambda line: None, fleet=Fleet(workers, fleet.evaluator)), 120))
    finally:
        trainer.close()
    assert sorted(set(seen)) == [(1, 0), (2, 1), (3, 2)]
