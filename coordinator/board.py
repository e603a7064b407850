"""The live state of a run, in plain Python: the round loop writes it, the status
service and the terminal progress read it. Every change wakes the watchers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

from coordinator.clients import Score

CONNECTING, IDLE, TRAINING, DONE, FAILED = "connecting", "idle", "training", "done", "failed"
STARTING, RUNNING, FINISHED = "starting", "running", "finished"


@dataclass
class WorkerView:
    name: str
    address: str
    state: str = CONNECTING
    last_contribution: int = 0
    failures: int = 0
    last_error: str = ""
    last_train_seconds: float = 0.0
    last_train_loss: float = 0.0
    last_base_version: int = 0
    last_staleness: int = 0
    # DP-SGD: the worker's cumulative epsilon for the run at `delta`, from the last
    # committed round (or version) it contributed to; 0 without DP.
    epsilon: float = 0.0
    delta: float = 0.0


@dataclass
class ScoreView:
    model: str
    accuracy: float
    loss: float
    correct: int
    total: int
    # The task's named metrics (loss, accuracy, recall/<class>, or a custom task's own).
    metrics: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, model: str, score: Score) -> "ScoreView":
        return cls(model, score.accuracy, score.loss, score.correct, score.total, dict(score.metrics))


@dataclass
class RunBoard:
    rounds: int
    out_dir: str
    workers: Dict[str, WorkerView]
    state: str = STARTING
    round: int = 0
    first_round: int = 1
    error: str = ""
    last_evaluated_round: int = 0
    last_evaluation: List[ScoreView] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    round_durations: List[float] = field(default_factory=list)
    version: int = 0
    _changed: Optional[asyncio.Event] = None

    @classmethod
    def for_workers(cls, rounds: int, out_dir: str, workers: Dict[str, str]) -> "RunBoard":
        return cls(rounds, out_dir, {name: WorkerView(name, address) for name, address in workers.items()})

    def touch(self) -> None:
        """Record a change and wake everyone waiting in `wait_change`."""
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_change(self, seen: int) -> int:
        """Return the version once it differs from `seen`."""
        while self.version == seen:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        return self.version

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def eta(self) -> float:
        if not self.round_durations:
            return 0.0
        done = self.first_round - 1 + len(self.round_durations)
        return sum(self.round_durations) / len(self.round_durations) * max(self.rounds - done, 0)

    def worker_answered(self, name: str) -> None:
        self.workers[name].state = IDLE
        self.touch()

    def start_round(self, number: int, asked: List[str]) -> None:
        self.state, self.round = RUNNING, number
        for name in asked:
            self.workers[name].state = TRAINING
        self.touch()

    def worker_training(self, name: str) -> None:
        """An asynchronous run's worker took a model version to train."""
        self.workers[name].state = TRAINING
        self.touch()

    def worker_done(self, name: str, round_number: int, seconds: float, loss: float, base_version: int = 0,
                    staleness: int = 0) -> None:
        view = self.workers[name]
        view.state, view.last_contribution, view.failures, view.last_error = DONE, round_number, 0, ""
        view.last_train_seconds, view.last_train_loss = seconds, loss
        view.last_base_version, view.last_staleness = base_version, staleness
        self.touch()

    def worker_failed(self, name: str, reason: str) -> None:
        view = self.workers[name]
        view.state, view.failures, view.last_error = FAILED, view.failures + 1, reason
        self.touch()

    def privacy_spent(self, epsilons: Mapping[str, float], delta: float) -> None:
        """A committed round's DP-SGD record: each contributor's cumulative epsilon for
        the run at `delta`, as its accountant reported it. Workers not named keep theirs
        (an epsilon only grows with the rounds a worker trains)."""
        for name, epsilon in epsilons.items():
            view = self.workers.get(name)
            if view is not None:
                view.epsilon, view.delta = epsilon, delta
        self.touch()

    def end_round(self, seconds: float) -> None:
        self.round_durations.append(seconds)
        self.touch()

    def evaluated(self, round_number: int, scores: Mapping[str, Score]) -> None:
        """The scores of `round_number`'s models by key ("global" or a worker's name)."""
        self.last_evaluated_round = round_number
        self.last_evaluation = [ScoreView.of(model, score) for model, score in scores.items()]
        self.touch()

    def end(self, error: str = "") -> None:
        self.state, self.error = (FAILED, error) if error else (FINISHED, "")
        self.touch()
