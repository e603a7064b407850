"""The asynchronous driver (FedBuff, FedAsync): every worker trains continuously on the
newest global model it can get; each update is buffered as it arrives, and every
`buffer_size` updates the strategy takes a server step, making a new model version.

Versions replace rounds: `--rounds N` is N server steps. Each update records the version
it started from and its staleness (the steps taken while it trained); one staler than
`max_staleness` is dropped, the others count (1 + staleness)^-exponent and are taken as
deltas from the model they started from. A slow board never holds the fleet: the others
go on, and its updates still count, discounted.

Evaluation runs every --eval-every versions beside training, never blocking it: a
version's record is committed (checkpoint, metrics line) once its evaluation is done,
in version order, while the workers already train on later versions. A resumed run
starts from the last committed version with an empty buffer (updates in flight when it
stopped are lost), so unlike a synchronous run it is not bit-identical to an unbroken
one.

DP-SGD (--dp-noise-multiplier) is recorded as in a synchronous round: each version's
record has every update's (epsilon, delta) and a `privacy` entry with each
contributor's cumulative epsilon. A worker that refuses for its privacy budget
(RESOURCE_EXHAUSTED, jetfed.privacy.refused_for_budget) is asked no more: its ledger
only grows. Once every worker has refused so, the run stops with the synchronous
driver's line (federation.budget_spent), not after --round-timeout of silence."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple

from coordinator import screening
from coordinator.clients import Score, Update, Weights
from coordinator.failures import describe_failure
from coordinator.federation import Federation, RunFailed, budget_spent
from coordinator.strategies.base import Contribution
from jetfed import privacy
from jetfed.codec import StateDict
from jetfed.errors import JetfedError

log = logging.getLogger(__name__)


@dataclass
class Step:
    """A server step (or a synchronous round, coordinator.rounds) ready to commit: its
    record, its model, the strategy's state then, and its evaluation when this version
    is scored (a Score or None here; a RoundEvaluation for a round)."""

    record: Dict[str, Any]
    weights: Weights
    strategy_state: Any
    evaluation: Optional["asyncio.Future[Any]"] = None
    # Set once the step is checkpointed, for a driver that must not go on before (see
    # Strategy.workers_keep_state).
    committed: Optional[asyncio.Event] = None


@dataclass(frozen=True)
class _Arrival:
    update: Update
    base_version: int
    dispatched: int


class BufferedDriver:
    def __init__(self, federation: Federation, first_version: int,
                 look_again: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        self.federation = federation
        # DNS discovery: looked up again after each step; a worker it adds to the roster
        # starts its own loop (one found at a new address is asked there by its loop).
        self._look_again = look_again
        self._looking: "Optional[asyncio.Future[None]]" = None
        self._loops: "Dict[str, asyncio.Future[None]]" = {}
        self.settings = federation.settings
        params = self.settings.strategy.resolved()
        self.buffer_size = int(params["buffer_size"])
        self.max_staleness = int(params["max_staleness"])
        # The model a version's updates started from, kept while an update may still refer to it.
        self.version = first_version - 1
        self.models: Dict[int, Weights] = {self.version: federation.global_weights}
        self.buffer: List[_Arrival] = []
        self.dropped: Dict[str, str] = {}
        self.failed: Dict[str, str] = {}
        # Workers that refused for their privacy budget, with their refusal: never asked again.
        self.spent: Dict[str, str] = {}
        self.dispatched = 0
        self.balance = bool(params["balance"])
        # Each worker's mean seconds per update (dispatch to arrival), for `balance`.
        self.pace: Dict[str, float] = {}
        self.started = time.perf_counter()
        self._steps: "asyncio.Queue[Optional[Step]]" = asyncio.Queue()
        self._done = asyncio.Event()
        self._crash: Optional[BaseException] = None
        # --max-concurrency: at most this many workers train at once (FedBuff's
        # "concurrency"); the others wait their turn in arrival order. 0: every worker.
        self._slots = asyncio.Semaphore(self.settings.max_concurrency) if self.settings.max_concurrency else None

    @property
    def last_version(self) -> int:
        return self.settings.rounds

    def lr(self, version: int) -> float:
        """The recipe's lr schedule in rounds' worth of updates: a version takes
        buffer_size updates where a round takes one per worker, so the lr decays per
        update as in a synchronous run of the same fleet."""
        workers = max(len(self.federation.roster.names), 1)
        return self.settings.lr_for(1 + version * self.buffer_size / workers)

    def _pace(self, name: str) -> float:
        """`name`'s time per update over the fleet's mean (1 until two have answered)."""
        if not self.balance or len(self.pace) < 2 or name not in self.pace:
            return 1.0
        return self.pace[name] / (sum(self.pace.values()) / len(self.pace))

    async def steps(self) -> AsyncIterator[Step]:
        """Run the fleet until the last version is made; yield each step as it is made."""
        for name in self.federation.strategy.select(self.version + 1, self.federation.roster.names):
            self._start(name)
        # A round's every attempt may take round_timeout: no step for that long is a
        # fleet that cannot make one (all down, or refusing), not a slow one.
        patience = self.settings.round_timeout * (self.settings.round_retries + 1)
        try:
            while True:
                try:
                    step = await asyncio.wait_for(self._steps.get(), patience)
                except asyncio.TimeoutError:
                    raise RunFailed(
                        f"version {self.version + 1}: no server step for {patience:.0f}s (--round-timeout x "
                        f"(--round-retries + 1)); {len(self.buffer)} of {self.buffer_size} updates buffered; last "
                        f"failures: {self.failed or 'none'}") from None
                if step is None:
                    if self._crash is not None:
                        raise self._crash
                    return
                self._look_for_joins()
                yield step
        finally:
            self._done.set()
            loops = list(self._loops.values()) + ([self._looking] if self._looking is not None else [])
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    def _start(self, name: str) -> None:
        loop = self._loops[name] = asyncio.ensure_future(self._keep_busy(name))
        loop.add_done_callback(self._ended)

    def _look_for_joins(self) -> None:
        """One lookup at a time, beside training (never awaited by a step)."""
        if self._look_again is not None and (self._looking is None or self._looking.done()):
            self._looking = asyncio.ensure_future(self._join_found())

    async def _join_found(self) -> None:
        assert self._look_again is not None
        try:
            await self._look_again()
        except Exception:  # the workers known train on; the next step looks again
            log.warning("version=%d: looking up workers failed", self.version, exc_info=True)
            return
        for name in self.federation.roster.names:
            if name not in self._loops and not self._done.is_set():
                log.info("version=%d worker=%s joined: training from the next version", self.version, name)
                self._start(name)

    def _ended(self, loop: "asyncio.Future[None]") -> None:
        """A worker's loop ends with the run, or on an error that is no failed call (a
        bug): that one ends the run at once, rather than leave the fleet a worker short."""
        if not loop.cancelled() and loop.exception() is not None:
            self._crash = loop.exception()
            self._steps.put_nowait(None)

    async def _keep_busy(self, name: str) -> None:
        """One worker's loop: train on the newest model, hand the update in, again; after
        a failure wait out the roster's backoff. Ends with the run."""
        federation = self.federation
        while not self._done.is_set() and name not in self.spent:
            record = federation.roster.record(name)
            wait = record.retry_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self._slots is not None:
                async with self._slots:
                    try:
                        await self._train_once(name)
                    finally:
                        await federation.hang_up(name)
            else:
                await self._train_once(name)

    async def _train_once(self, name: str) -> None:
        """One update of `name`'s, from the newest model now: dispatched, trained,
        checked and handed in; a failure is recorded and backed off."""
        federation = self.federation
        base = self.version
        self.dispatched += 1
        number = self.dispatched
        config = federation.strategy.configure(base, replace(self.settings.train, lr=self.lr(base)))
        federation.board.worker_training(name)
        asked = time.perf_counter()
        try:
            update = await federation.train_on(name, number, config, self.models[base])
        except JetfedError as failure:  # a failed call: recorded, backed off, asked again
            federation.forget(name)
            reason = describe_failure(failure)
            self.failed[name] = reason
            delay = federation.roster.failed(name, reason)
            federation.board.worker_failed(name, reason)
            if privacy.refused_for_budget(reason):
                self._out_of_budget(name, reason)
                return
            log.warning("version=%d worker=%s status=%s retry_in=%.1fs", self.version, name, reason, delay)
            return
        problem = federation.claim_problem(update, config)
        if problem:
            self.failed[name] = problem
            federation.roster.failed(name, problem)
            federation.board.worker_failed(name, problem)
            return
        seconds = time.perf_counter() - asked
        self.pace[name] = seconds if name not in self.pace else 0.7 * self.pace[name] + 0.3 * seconds
        federation.roster.succeeded(name, self.version)
        federation.board.worker_done(name, self.version, update.train_seconds, update.mean_loss, base,
                                     self.version - base)
        self._arrive(_Arrival(update, base, number))

    def _out_of_budget(self, name: str, reason: str) -> None:
        """`name` trains no more for this run; when that leaves no worker, the run ends."""
        self.spent[name] = reason
        log.warning("version=%d worker=%s has spent its privacy budget; it is asked no more: %s",
                    self.version, name, reason)
        if all(worker in self.spent for worker in self.federation.roster.names) and self._crash is None:
            self._crash = RunFailed(budget_spent(f"version {self.version + 1}", self.settings, dict(self.spent)))
            self._steps.put_nowait(None)

    def _arrive(self, arrival: _Arrival) -> None:
        staleness = self.version - arrival.base_version
        if staleness > self.max_staleness:
            self.dropped[arrival.update.worker] = (f"{staleness} versions stale (from version {arrival.base_version}), "
                                                   f"over max_staleness {self.max_staleness}")
            log.info("version=%d worker=%s update dropped: %s", self.version, arrival.update.worker,
                     self.dropped[arrival.update.worker])
            return
        self.buffer.append(arrival)
        if len(self.buffer) >= self.buffer_size and self.version < self.last_version:
            self._step()

    def _step(self) -> None:
        """A server step over the buffer: clip loud updates (screening's rule, each from
        its own base), aggregate, make the next version."""
        federation = self.federation
        arrivals, self.buffer = self.buffer, []
        current = self.models[self.version]
        states, clipped, norms = self._clipped(arrivals)
        paces = [self._pace(a.update.worker) for a in arrivals]
        contributions = [
            Contribution(a.update.worker, states[i], a.update.num_examples, a.base_version,
                         self.version - a.base_version, None if a.base_version == self.version else
                         self.models[a.base_version].state, pace=paces[i])
            for i, a in enumerate(arrivals)
        ]
        new_state = federation.strategy.aggregate(current.state, contributions)
        self.version += 1
        weights = Weights.of(new_state, federation.model)
        federation.adopt(weights, [a.update for a in arrivals])
        self.models[self.version] = weights
        for old in [v for v in self.models if v < self.version - self.max_staleness]:
            del self.models[old]
        record: Dict[str, Any] = {
            "round": self.version, "version": self.version, "lr": self.lr(self.version - 1),
            "elapsed_s": time.perf_counter() - self.started,
            "workers": [a.update.worker for a in arrivals],
            "updates": _by_worker([{
                "base_version": a.base_version, "staleness": self.version - 1 - a.base_version,
                "num_examples": a.update.num_examples, "mean_loss": a.update.mean_loss,
                "train_seconds": a.update.train_seconds, "device": a.update.device, "delta_norm": norms[i],
                "pace": paces[i], **a.update.traffic(),
                **({"epsilon": a.update.epsilon, "delta": a.update.delta} if a.update.epsilon else {}),
            } for i, a in enumerate(arrivals)], [a.update.worker for a in arrivals]),
            "failed": dict(self.failed), "dropped": dict(self.dropped), "clipped": clipped, "late": [],
            "attempts": 1, "skipped": [],
        }
        if self.settings.train.private:  # as a round's: each contributor's cumulative epsilon after this version
            spent: Dict[str, float] = {}
            for a in arrivals:  # a worker with two updates here: the later, larger epsilon
                spent[a.update.worker] = max(spent.get(a.update.worker, 0.0), a.update.epsilon)
            record["privacy"] = {"delta": self.settings.train.dp_delta, "epsilon": spent,
                                 "max_epsilon": max(spent.values())}
        note = federation.strategy.note()
        if note:
            record["strategy"] = note
        self.failed, self.dropped = {}, {}
        tensors, values = federation.strategy.state_dict()
        step = Step(record, weights, ({k: v.clone() for k, v in tensors.items()}, dict(values)))
        if federation.evaluator and self.settings.evaluates(self.version):
            step.evaluation = asyncio.ensure_future(self._score(weights))
        self._steps.put_nowait(step)
        if self.version >= self.last_version:
            self._steps.put_nowait(None)

    def _clipped(self, arrivals: List[_Arrival]) -> Tuple[List[StateDict], Dict[str, str], List[float]]:
        """screening.clip_to_bound over the buffer, each change taken from its own base:
        the states to aggregate, a note by worker for each one scaled, every norm."""
        keys = [str(i) for i in range(len(arrivals))]  # a fast worker may have two updates in a buffer
        bases = {k: self.models[a.base_version].state for k, a in zip(keys, arrivals)}
        norms = {k: screening.delta_norm(a.update.weights.state, bases[k]) for k, a in zip(keys, arrivals)}
        states, notes = screening.clip_to_bound({k: a.update.weights.state for k, a in zip(keys, arrivals)},
                                                self.models[self.version].state, norms,
                                                self.settings.max_norm_ratio, bases)
        clipped = {arrivals[int(k)].update.worker: note for k, note in notes.items()}
        return [states[k] for k in keys], clipped, [norms[k] for k in keys]

    async def _score(self, weights: Weights) -> Optional[Score]:
        """The global model of a version on the evaluator; None when that fails (noted in
        the log; training is never held for it)."""
        evaluator = self.federation.evaluator
        assert evaluator is not None
        try:
            return await evaluator.evaluate("global", weights, self.settings.eval_timeout)
        except JetfedError as failure:  # an evaluator down is not the run's end
            log.warning("version=%d evaluation failed: %s", self.version, describe_failure(failure))
            return None


def _by_worker(entries: List[Dict[str, Any]], workers: List[str]) -> Dict[str, Dict[str, Any]]:
    """A step's updates keyed by worker, as a round's are; a worker with two updates in
    one buffer (a fast board) has the second as "name#2"."""
    keyed: Dict[str, Dict[str, Any]] = {}
    for worker, entry in zip(workers, entries):
        key, n = worker, 1
        while key in keyed:
            n += 1
            key = f"{worker}#{n}"
        keyed[key] = entry
    return keyed


async def settle(step: Step) -> Optional[Score]:
    """The step's evaluation, once done (None when it was not scored or failed)."""
    if step.evaluation is None:
        return None
    return await step.evaluation

