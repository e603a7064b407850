"""The coordinator's side of secure aggregation (docs/secagg.md): keys agreed once per
run (and again for a worker that must re-key), then each synchronous round as one
masked Train per worker plus one SecAggUnmask call, so the coordinator learns the sum
of the survivors' updates and nothing about any one of them.

Weighting: each worker masks weight x its update and the weight (jetfed.secagg.update);
the coordinator divides the two sums. With --weighting examples the weight is the
worker's examples over the round's most possible (the weighted FedAvg mean exactly:
the division cancels the unit); with equal, 1. The weight is in the masked sum rather
than taken from the example counts workers report in the clear, so the division uses
the very weights the sum was made with.

The mean update then goes to the strategy's server step as one contribution (FedAvg,
FedAvgM, FedAdam...: the sum-only family; settings refuse the others at start-up).
Per-update screening (the norm bound, scoring each update) cannot run: the fixed-point
clip bounds each worker's influence on every coordinate instead."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from coordinator import screening
from coordinator.failures import Failure, Kind, describe_failure
from coordinator.clients import Update
from coordinator.secure_client import MaskedUpdate
from coordinator.strategies.base import Contribution, Strategy
from jetfed.codec import StateDict
from jetfed.errors import JetfedError
from jetfed.secagg import FixedPoint, ProtocolViolation, SecAggError, SecAggServer, proto, update

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger(__name__)

# How long survivors get to answer the unmask call: a few hundred bytes each way.
UNMASK_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 30.0
OLD_WORKER = "UNIMPLEMENTED"


@dataclass
class SecureOutcome:
    """One secure attempt: the survivors' figures (no weights), the next model's mean
    state (None: the round was refused), and its record for metrics.jsonl."""

    updates: List[Update] = field(default_factory=list)
    state: Optional[StateDict] = None
    note: Dict[str, Any] = field(default_factory=dict)


class SecureRounds:
    def __init__(self, *, threshold: int, clip: float, max_workers: int) -> None:
        self.fixed_point = FixedPoint.for_fleet(clip, max_workers)
        self.threshold = threshold
        self.server: Optional[SecAggServer] = None
        self._round = 0
        self._epochs: Dict[str, int] = {}

    async def setup(self, fed: "Federation") -> None:
        """Keys for every worker that answered at start. A worker without secure
        aggregation (UNIMPLEMENTED: older than it) stops the run here, before any of
        its updates could be sent in the clear."""
        length = update.vector_length(fed.global_weights.manifest.tensors)
        self.server = SecAggServer(run_id=fed.run_id, threshold=self.threshold, fixed_point=self.fixed_point,
                                   length=length)
        names = [n for n in fed.roster.names if n in fed._infos]
        failures = await self._key(fed, names)
        old = {n: reason for n, reason in failures.items() if reason.startswith(OLD_WORKER)}
        if old:
            from coordinator.federation import RunFailed
            raise RunFailed("--secure-aggregation: " + "; ".join(
                f"worker {n} does not support secure aggregation ({reason})" for n, reason in old.items())
                + ". Upgrade those workers, or run without --secure-aggregation; their updates are never sent "
                  "in the clear instead")
        for name, reason in failures.items():
            log.warning("secagg worker=%s setup failed at start: %s", name, reason)
        fed.say(f"Secure aggregation: {len(self.server.members())} workers keyed, threshold {self.threshold}, "
                f"fixed point clip {self.fixed_point.clip:g} scale 2^{int(math.log2(self.fixed_point.scale))}; "
                "the coordinator sees only the sum of the updates (none is scored or screened one by one)")

    async def _key(self, fed: "Federation", names: List[str]) -> Dict[str, str]:
        """S1 and S2 for each of `names` without usable keys (new, restarted, or whose
        mask key may have been revealed); the failures, by worker."""
        assert self.server is not None
        server = self.server
        rekey = set(server.must_rekey())
        need = [n for n in names if n not in server.members() or n in rekey]
        if not need:
            return {}
        failures: Dict[str, str] = {}
        adverts = await asyncio.gather(*(fed.workers[n].advertise(
            self.fixed_point, rekey=n in self._epochs, min_epoch=self._epochs.get(n, 0) + 1,
            timeout=SETUP_TIMEOUT_S) for n in need), return_exceptions=True)
        def accept(advert: Any) -> None:
            server.receive_advertisement(advert)
            self._epochs[advert.worker] = advert.epoch

        advertised = _received(need, adverts, accept, failures)
        if not advertised:
            return failures
        try:
            roster = server.roster()
        except SecAggError as exc:
            return {**failures, **{n: f"FAILED_PRECONDITION: {exc}" for n in advertised}}
        replies = await asyncio.gather(*(fed.workers[n].share_keys(roster, SETUP_TIMEOUT_S) for n in advertised),
                                       return_exceptions=True)
        _received(advertised, replies, server.receive_key_shares, failures)
        if failures:
            log.warning("secagg setup failed: %s", failures)
        log.info("secagg keyed=%s members=%s", ",".join(n for n in advertised if n not in failures),
                 ",".join(server.members()))
        return failures

    async def attempt(self, fed: "Federation", round_number: int, names: List[str],
                      record: Dict[str, Any]) -> SecureOutcome:
        """One attempt at a round: keys where missing, a masked Train to each participant,
        the unmask call to each survivor, the sum. A refused round (too few inputs or
        answers, an aggregate out of range) is an attempt with no updates: the round is
        tried again as any round that missed its quorum."""
        assert self.server is not None
        server, settings = self.server, fed.settings
        config = fed.strategy.configure(round_number, replace(settings.train, lr=settings.lr_for(round_number)))
        fed.board.start_round(round_number, names)
        failures: Dict[str, str] = {}
        for name in names:  # what each may claim bounds the weights: its GetInfo first
            if name not in fed._infos:
                try:
                    fed._learn(name, await fed.workers[name].info(timeout=SETUP_TIMEOUT_S, wait=False))
                except JetfedError as exc:
                    failures[name] = _reason(exc)
        failures.update(await self._key(fed, [n for n in names if n not in failures]))
        self._round = max(self._round + 1, round_number)
        note: Dict[str, Any] = {"round": self._round, "threshold": self.threshold, "clip": self.fixed_point.clip,
                                "scale": self.fixed_point.scale}
        outcome = SecureOutcome(note=note)
        try:
            start = server.start_round(self._round, [n for n in names if n not in failures])
        except SecAggError as exc:
            return self._refused(fed, round_number, outcome, exc, failures, record)
        participants = start.participants
        note["participants"] = list(participants)
        unit = 0.0
        if settings.weighting == "examples":
            unit = float(max(screening.max_examples(config, fed._infos[n].dataset_size) for n in participants))
        message = proto.round_start_to_proto(start, server.roster(), unit)
        for name in participants:
            fed.workers[name].arm(message)
        try:
            results = await asyncio.gather(*(fed.train_on(n, round_number, config, fed.global_weights)
                                              for n in participants), return_exceptions=True)
        finally:
            for name in participants:
                fed.workers[name].arm(None)
        heard: Dict[str, Update] = {}
        for name, result in zip(participants, results):
            if isinstance(result, BaseException):
                if not isinstance(result, JetfedError):
                    raise result
                if isinstance(result, Failure) and result.kind is Kind.LATE:
                    record["late"].append(name)
                fed.forget(name)
                failures[name] = describe_failure(result)
                continue
            problem = fed.claim_problem(result, config)
            if problem:
                failures[name] = problem
                continue
            assert isinstance(result, MaskedUpdate) and result.masked is not None  # an armed SecureWorkerClient's
            try:
                server.receive_masked_input(result.masked)
            except ProtocolViolation as exc:
                log.warning("round=%d secagg worker=%s masked input refused: %s", round_number, name, exc)
                failures[name] = f"INVALID: {exc}"
                continue
            heard[name] = result
        try:
            requests = server.close_masked_inputs(start.round_number)
        except SecAggError as exc:
            return self._refused(fed, round_number, outcome, exc, failures, record)
        timeout = min(settings.round_timeout, UNMASK_TIMEOUT_S)
        replies = await asyncio.gather(*(fed.workers[n].unmask(r, timeout) for n, r in requests.items()),
                                       return_exceptions=True)
        silent: Dict[str, str] = {}
        for name, reply in zip(requests, replies):
            if isinstance(reply, BaseException):
                if not isinstance(reply, JetfedError):
                    raise reply
                silent[name] = describe_failure(reply)
                continue
            try:
                server.receive_unmask_response(reply)
            except ProtocolViolation as exc:
                silent[name] = f"INVALID: {exc}"
        if silent:
            note["unmask_failed"] = silent
            for name, reason in silent.items():
                log.warning("round=%d secagg worker=%s unmask failed (it must re-key): %s", round_number, name, reason)
        try:
            aggregate = server.finish(start.round_number)
            outcome.state, weights = update.mean_state(fed.global_weights.state, aggregate.values)
        except SecAggError as exc:
            return self._refused(fed, round_number, outcome, exc, failures, record)
        note.update(survivors=list(aggregate.survivors), dropped=list(aggregate.dropped), weight_sum=weights)
        self._settle(fed, round_number, failures, record)
        for name in names:
            if name in aggregate.survivors:
                result = heard[name]
                outcome.updates.append(result)
                fed.roster.succeeded(name, round_number)
                fed.board.worker_done(name, round_number, result.train_seconds, result.mean_loss)
                record["failed"].pop(name, None)
        log.info("round=%d secagg round=%d survivors=%s dropped=%s", round_number, start.round_number,
                 ",".join(aggregate.survivors), ",".join(aggregate.dropped) or "none")
        return outcome

    def step(self, strategy: Strategy, global_state: StateDict, outcome: SecureOutcome, round_number: int) -> StateDict:
        """The strategy's server step along the mean update, as one contribution."""
        assert outcome.state is not None
        examples = max(sum(u.num_examples for u in outcome.updates), 1)
        return strategy.aggregate(global_state, [Contribution("secure-aggregate", outcome.state, examples,
                                                              round_number - 1)])

    def _refused(self, fed: "Federation", round_number: int, outcome: SecureOutcome, exc: Exception,
                 failures: Dict[str, str], record: Dict[str, Any]) -> SecureOutcome:
        outcome.note["refused"] = f"{type(exc).__name__}: {exc}"
        log.warning("round=%d secagg round refused: %s", round_number, exc)
        fed.say(f"Round {round_number}: secure aggregation refused the round: {exc}")
        self._settle(fed, round_number, failures, record)
        return outcome

    @staticmethod
    def _settle(fed: "Federation", round_number: int, failures: Dict[str, str], record: Dict[str, Any]) -> None:
        for name, reason in failures.items():
            fed._failed(round_number, name, reason, record)


def _received(names: List[str], replies: List[Any], receive: Callable[[Any], None],
              failures: Dict[str, str]) -> List[str]:
    """Each setup reply handed to `receive`; a failed call, or a message it refuses,
    goes into `failures` by name instead. The names whose replies were taken."""
    taken = []
    for name, reply in zip(names, replies):
        if isinstance(reply, BaseException):
            failures[name] = _reason(reply)
            continue
        try:
            receive(reply)
        except SecAggError as exc:
            failures[name] = f"INVALID: {exc}"
            continue
        taken.append(name)
    return taken


def _reason(error: BaseException) -> str:
    if isinstance(error, Exception):
        return describe_failure(error)
    raise error
