"""The synchronous driver: rounds one after another, each round's evaluation beside the
rounds that follow it, never in front of them.

A round that is due for evaluation hands its models (the new global model and, with
--score-updates, each update) to the evaluator and the next round starts at once. Each
round becomes a Step, committed in round order (checkpoint, then metrics line) once its
evaluation is in, as the asynchronous driver commits its versions
(coordinator.buffered). A round is therefore committed only after every earlier one,
with its own model and strategy state taken when it ended: a run stopped while round k
is being scored resumes from round k-1's checkpoint and trains round k again, which
gives the same model bit for bit (rounds replay exactly), so a resumed run is still the
unbroken one.

The console reads as if each evaluation ended before the next round began: while a round
is uncommitted, the lines said are held and printed after its own (Console). How many rounds may
wait for an evaluation is bounded (lag_bound), which bounds the models held."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Dict, List, Optional, Set, Tuple

from coordinator.buffered import Step
from coordinator.clients import Score, Weights
from coordinator.failures import describe_failure
from coordinator.federation import Federation, RunFailed, Say
from jetfed.errors import JetfedError

log = logging.getLogger(__name__)

# The models that rounds waiting for an earlier round's evaluation may hold, in bytes of
# global model; at least two rounds always (the one scored and the one after it).
LAG_BYTES = 64 * 1024 * 1024
MIN_LAG_ROUNDS = 2


def lag_bound(model_bytes: int) -> int:
    """How many finished rounds may wait uncommitted behind an evaluation: mnist-cnn
    (1.7 MB) 37, resnet18 (45 MB) 2. Past it, training waits for the evaluator."""
    return max(MIN_LAG_ROUNDS, LAG_BYTES // max(model_bytes, 1))


@dataclass
class RoundEvaluation:
    """A round's evaluation as it ended: the scores by key ("global" or a worker's
    name) and the console lines in the reference's order, or why it failed."""

    scores: Dict[str, Score]
    lines: List[str]
    error: str
    seconds: float


class Console:
    """Lines said while an earlier round is not yet committed (its evaluation still
    out) are held behind it, and printed after its evaluation's lines once it is
    (release): the order of a run that waited for each evaluation, and a "Training round
    k" line still means round k-1 is in the checkpoint."""

    def __init__(self, say: Say) -> None:
        self._say = say
        self._held: Deque[Tuple[int, List[str]]] = deque()

    def say(self, line: str) -> None:
        if self._held:
            self._held[-1][1].append(line)
        else:
            self._say(line)

    def hold(self, round_number: int) -> None:
        """From now on, lines wait for round `round_number`'s commit."""
        self._held.append((round_number, []))

    def release(self, round_number: int, lines: List[str]) -> None:
        """Round `round_number` is committed: its evaluation's lines, then what was held
        behind it."""
        for line in lines:
            self._say(line)
        if self._held and self._held[0][0] == round_number:
            _, held = self._held.popleft()
            for line in held:  # said before the next evaluation began: they go now
                self._say(line)


@dataclass
class Tally:
    """What the rounds run in this process added up to, for the run's summary."""

    train_seconds: float = 0.0
    contributed: Set[str] = field(default_factory=set)
    trained_at: float = 0.0  # when the last round's training ended (perf_counter)


class RoundDriver:
    """Trains rounds `first`..N in a task of its own and yields each as a Step (its
    evaluation, when due, still running), in order; `look_again` runs between rounds
    (DNS discovery)."""

    def __init__(
        self, federation: Federation, first: int, console: Console,
        look_again: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> None:
        self.federation = federation
        self.first = first
        self.console = console
        self.look_again = look_again
        self.tally = Tally()
        self._steps: "asyncio.Queue[Optional[Step]]" = asyncio.Queue(
            lag_bound(federation.global_weights.manifest.total_bytes))
        self._evaluations: List["asyncio.Future[RoundEvaluation]"] = []
        self._failure: Optional[BaseException] = None

    async def steps(self) -> AsyncIterator[Step]:
        """Each round's Step in order; a round that fails ends the run after the rounds
        before it are yielded (so they are committed, as when rounds waited for their
        evaluations)."""
        producer = asyncio.ensure_future(self._train())
        try:
            while True:
                step = await self._steps.get()
                if step is None:
                    if self._failure is not None:
                        raise self._failure
                    return
                yield step
        finally:
            producer.cancel()
            for evaluation in self._evaluations:
                evaluation.cancel()
            await asyncio.gather(producer, *self._evaluations, return_exceptions=True)

    async def _train(self) -> None:
        try:
            for round_number in range(self.first, self.federation.settings.rounds + 1):
                await self._round(round_number)
            self.tally.trained_at = time.perf_counter()
        except asyncio.CancelledError:
            raise
        except BaseException as failure:  # a failed round, or a bug: the run ends with it
            self._failure = failure
        await self._steps.put(None)

    async def _round(self, round_number: int) -> None:
        federation = self.federation
        if self.look_again is not None and round_number > self.first:
            await self.look_again()
        settings = federation.settings
        telemetry, board = federation.telemetry, federation.board
        self.console.say(f"Training round {round_number}/{settings.rounds}")
        telemetry.set_round(round_number)
        started = time.perf_counter()
        try:
            record = await federation.train_round(round_number)
        except RunFailed:
            telemetry.observe_round(time.perf_counter() - started, "failed")
            raise
        if round_number == self.first and federation.absent:
            record["unreachable_at_start"] = dict(federation.absent)
        self.tally.contributed.update(record["workers"])
        telemetry.set_workers_contributing(len(record["workers"]))
        record["train_s"] = time.perf_counter() - started
        self.tally.train_seconds += record["train_s"]
        tensors, values = federation.strategy.state_dict()
        step = Step(record, federation.global_weights,
                    ({k: v.clone() for k, v in tensors.items()}, copy.deepcopy(values)))
        # The round's own time: its evaluation runs beside the next rounds.
        record["duration_s"] = record["train_s"]
        if federation.evaluator and settings.evaluates(round_number):
            evaluation = asyncio.ensure_future(self._evaluate(round_number, federation.round_models()))
            self._evaluations.append(evaluation)
            step.evaluation = evaluation
        self.console.hold(round_number)  # lines said from now on print once this round is committed
        if federation.strategy.workers_keep_state:
            step.committed = asyncio.Event()
        full = time.perf_counter()
        await self._steps.put(step)  # full: lag_bound rounds wait for an evaluation, and so does training
        if step.committed is not None:  # the workers keep only the last rounds' state
            await step.committed.wait()
        waited = time.perf_counter() - full
        if waited > 0.01:
            log.info("round=%d waited %.2fs for the evaluator (at most %d rounds wait for an evaluation)",
                     round_number, waited, self._steps.maxsize)
        self._evaluations = [e for e in self._evaluations if not e.done()]
        seconds = time.perf_counter() - started
        telemetry.observe_round(seconds, "completed")
        board.end_round(seconds)
        log.info("round=%d/%d workers=%d/%d duration=%.2fs elapsed=%.1fs eta=%.1fs", round_number, settings.rounds,
                 len(record["workers"]), len(settings.workers), seconds, board.elapsed, board.eta)

    async def _evaluate(self, round_number: int, models: List[Tuple[str, str, Weights]]) -> RoundEvaluation:
        """An unreachable or failing evaluator is recorded, not fatal: training goes on."""
        started = time.perf_counter()
        try:
            scores, lines = await self.federation.evaluate_round(round_number, models)
            return RoundEvaluation(scores, lines, "", time.perf_counter() - started)
        except JetfedError as failure:
            error = describe_failure(failure)
            log.warning("round=%d evaluation failed: %s", round_number, error)
            return RoundEvaluation({}, ["Evaluating models"], error, time.perf_counter() - started)


async def settled(step: Step) -> Optional[RoundEvaluation]:
    """The step's evaluation once in (None when the round was not due for one)."""
    if step.evaluation is None:
        return None
    result: Any = await step.evaluation
    return result
