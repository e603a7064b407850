"""The round loop: send the global model to the workers at once, average what comes
back in time and passes screening, score on schedule. Transport lives in clients,
screening in screening, arithmetic in fedavg, backoff in roster, output in report,
the fleet's agreement on its model in fleet_model, the run's first weights in
initial_weights; this module only sequences them. It holds no task code: the model is
known only as tensors, once the fleet has answered."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from coordinator import initial_weights, report, screening
from coordinator.board import RunBoard, WorkerView
from coordinator.clients import EvaluatorClient, Score, Update, Weights, WorkerClient
from coordinator.failures import Failure, Kind, describe_failure
from coordinator.fleet_model import FleetModel, ServiceModel, agree
from coordinator.initial_weights import Start
from coordinator.roster import Roster
from coordinator.secure_client import SecureWorkerClient
from coordinator.secure_rounds import SecureRounds
from coordinator.settings import MAX_PAYLOAD_BYTES, RunSettings
from coordinator.strategies.base import Accumulator, Contribution
from jetfed import codec, compression, privacy, stream, tls
from jetfed.auth import bearer_metadata
from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.errors import JetfedError, RunConflict
from jetfed.telemetry import RunTelemetry
from jetfed.v1 import info_pb2

log = logging.getLogger(__name__)

Say = Callable[[str], None]

_EVALUATOR = "evaluator"
_REMIND_EVERY_S = 5.0
# Models scored at once: under the evaluator's default --max-concurrent-streams (8), so
# a fleet of any size never meets its RESOURCE_EXHAUSTED; it scores one at a time anyway.
_CONCURRENT_EVALUATIONS = 4
# How long the evaluator may delay the start once the workers have answered: services
# started together come up within seconds of each other; one still silent is down.
_EVALUATOR_GRACE_S = 5.0
# How long a run's end waits for each worker's EndRun: a worker that does not answer at
# once frees itself anyway, within twice the run's round interval.
_END_RUN_TIMEOUT_S = 1.0
_UNREACHABLE_HINT = (
    "Likely causes: the worker is not started (or crashed: see its log or `systemctl status jetfed-worker@NAME`); "
    "a wrong host or port (compare with the 'listening on' line of its log); a firewall between the machines; "
    "or TLS on one side only (both sides need the --tls-* flags, or neither)."
)


@dataclass(frozen=True)
class Fleet:
    """Worker and evaluator proxies with the gRPC clients' methods (info, expect,
    initial_weights, train, end_run, close; info, evaluate, close), failing as they do
    with a coordinator.failures.Failure."""

    workers: Dict[str, Any]
    evaluator: Optional[Any] = None


class RunFailed(JetfedError):
    """The run cannot go on (a round missed its quorum on every attempt, or the fleet
    never came up); the last checkpoint is intact for --resume."""


@dataclass(frozen=True)
class RunSummary:
    rounds: int  # run by this process (fewer than the run's after --resume)
    final_score: Optional[Score]
    connect_seconds: float
    train_seconds: float
    eval_seconds: float
    model_path: Any
    workers: int = 0
    absent_at_start: Dict[str, str] = field(default_factory=dict)
    # Configured workers whose update was never averaged in this process's rounds.
    never_contributed: List[str] = field(default_factory=list)


def refused_by_another_run(reason: str) -> bool:
    """Whether a worker's failure, as describe_failure wrote it, is its refusal to serve
    this run while another coordinator's run holds it (RunConflict on the wire)."""
    return reason.startswith(f"{RunConflict.code.name}: ") and RunConflict.MARKER in reason


def budget_spent(where: str, settings: RunSettings, refusals: Dict[str, str]) -> str:
    """The line a run stops with when every worker asked refused for its privacy budget
    (jetfed.privacy.refused_for_budget): the synchronous driver's round and the
    asynchronous one's version say it alike."""
    return (f"{where}: every worker asked has spent its privacy budget "
            f"(--dp-epsilon-budget {settings.train.epsilon_budget:g} at delta {settings.train.dp_delta:g}); "
            "the run stops here: " + "; ".join(f"{name}: {reason}" for name, reason in refusals.items()))


# The weights of an update already folded into the round's step (streaming): its
# figures stay for the round's record, its tensors are gone.
_FOLDED = Weights(codec.Manifest("", (), 0, ""), b"", {})


@dataclass
class _Attempt:
    """What one attempt at a round heard: the updates accepted (in the order asked; a
    folded one keeps only its figures), the delta norm of each, and for a streaming
    round its step (fed, to finish once the quorum is met), the held updates it scaled
    and any loud update it folded unscaled (LoudHold.finish)."""

    step: Optional[Accumulator] = None
    updates: List[Update] = field(default_factory=list)
    norms: Dict[str, float] = field(default_factory=dict)
    clipped: Dict[str, str] = field(default_factory=dict)
    lost_bets: List[str] = field(default_factory=list)


class Federation:
    def __init__(
        self, settings: RunSettings, say: Say = print, board: Optional[RunBoard] = None,
        telemetry: Optional[RunTelemetry] = None, fleet: Optional["Fleet"] = None,
    ) -> None:
        """`fleet` replaces the gRPC clients with other proxies of the same shape (the
        in-process workers of `jetfed simulate`); by default the run talks gRPC to
        settings.workers and settings.evaluator."""
        self.settings = settings
        self.say = say
        self.telemetry = telemetry or RunTelemetry()
        self.strategy = settings.strategy.build(weighting=settings.weighting, seed=settings.train.seed,
                                                fleet_size=len(settings.workers))
        # Known once the fleet has answered (connect): its model, and the global weights.
        self.fleet: Optional[FleetModel] = None
        self._weights: Optional[Weights] = None
        # The first weights when they do not come from a worker: a checkpoint or a file.
        self._start: Optional[Start] = None
        credentials = settings.channel_credentials()
        if credentials is None and fleet is None:
            tls.warn_plaintext(log, "the coordinator's calls to the fleet")
        self._credentials, self._metadata = credentials, bearer_metadata(settings.token)
        # A fresh run's id; --resume puts back the one its checkpoint holds (run_id).
        self._run_id = secrets.token_hex(8)
        # What every Train result must be (WorkerClient.expect), once the fleet has answered.
        self._expected: Optional[Tuple[str, Tuple[Any, ...], int]] = None
        # How the global model travels to a worker that holds an earlier one (jetfed.compression).
        self._downlink = compression.Encoding.parse(settings.downlink_encoding, "downlink_encoding")
        # Secure aggregation: rounds of masked updates whose sum alone the coordinator learns.
        self._secure: Optional[SecureRounds] = None
        if settings.secure_aggregation:
            if fleet is not None:
                raise RunFailed("--secure-aggregation: jetfed simulate's in-process workers do not run it; "
                                "run the workers as services (jetfed worker)")
            self._secure = SecureRounds(threshold=settings.secagg_resolved_threshold, clip=settings.secagg_clip,
                                        max_workers=settings.secagg_max_workers or len(settings.workers))
        if fleet is None:
            self.workers: Dict[str, Any] = {name: self._client(name, address)
                                            for name, address in settings.workers.items()}
            self.evaluator: Optional[Any] = (
                EvaluatorClient(settings.evaluator, settings.chunk_bytes, credentials, self._metadata, self.telemetry)
                if settings.evaluator else None
            )
        else:
            self.workers, self.evaluator = dict(fleet.workers), fleet.evaluator
        self.roster = Roster(settings.workers, max_backoff=settings.max_backoff)
        self.board = board or RunBoard.for_workers(settings.rounds, str(settings.out_dir), settings.workers)
        self._infos: Dict[str, info_pb2.GetInfoResponse] = {}
        self._evaluator_info: Optional[info_pb2.GetInfoResponse] = None
        # Workers that did not answer at start, with the reason: warned about, recorded.
        self.absent: Dict[str, str] = {}
        self._updates: List[Update] = []
        # Evaluate calls in flight, whatever round they score (evaluate_round).
        self._evaluation_slots: Optional[asyncio.Semaphore] = None

    def _client(self, name: str, address: str) -> WorkerClient:
        kind = SecureWorkerClient if self._secure is not None else WorkerClient
        return kind(name, address, self.settings.chunk_bytes, credentials=self._credentials,
                    metadata=self._metadata, telemetry=self.telemetry, run_id=self._run_id)

    async def join(self, name: str, address: str) -> None:
        """A worker found after the start (coordinator.discovery), or one found again at
        a new address: asked from the next round on, its GetInfo first (it is checked
        against the fleet's model then). It counts in the quorum's majority as any
        worker given at the start does."""
        old = self.workers.get(name)
        self.workers[name] = client = self._client(name, address)
        if self._expected is not None:
            client.expect(*self._expected, downlink=self._downlink)
        self._infos.pop(name, None)
        self.roster.add(name)
        self.board.workers[name] = WorkerView(name, address)
        self.board.touch()
        self.settings = replace(self.settings, workers={**self.settings.workers, name: address})
        if old is not None:
            await old.close()

    @property
    def global_weights(self) -> Weights:
        if self._weights is None:
            raise RuntimeError("the global model is known once the fleet has connected")
        return self._weights

    @property
    def model(self) -> str:
        """The model's name, as the fleet reports it (every manifest carries it)."""
        if self.fleet is None:
            raise RuntimeError("the model is known once the fleet has connected")
        return self.fleet.model

    def restore(self, state: StateDict, model: str, round_number: int) -> None:
        """Start from a checkpoint; connect checks it is the fleet's model."""
        self._start = Start(state, f"the checkpoint of round {round_number}", model)

    def start_from_file(self) -> None:
        """Start from --init-weights (read and checked now, so a bad file fails before
        the fleet is awaited); connect checks it is the fleet's model."""
        path = self.settings.init_weights
        assert path is not None
        state = initial_weights.read_file(path, self.settings.max_payload_bytes or MAX_PAYLOAD_BYTES)
        self._start = Start(state, f"{initial_weights.SETTING} {path}")

    @property
    def run_id(self) -> str:
        """The id every Train of this run carries, so a worker that another coordinator's
        run holds refuses it (and this run's workers refuse the other); kept in the
        checkpoint, so a resumed run is the same run to the workers."""
        return self._run_id

    @run_id.setter
    def run_id(self, run_id: str) -> None:
        self._run_id = run_id
        for worker in self.workers.values():
            worker.run_id = run_id

    @property
    def beyond_bound(self) -> bool:
        """A fleet larger than --max-concurrency keeps no idle connection: a worker's is
        closed when its call ends (WorkerClient.release), so the open connections, and
        the read buffers gRPC keeps in each, are bounded like the calls, however many
        workers there are and however they are sampled."""
        bound = self.settings.max_concurrency
        return bool(bound) and len(self.workers) > bound

    async def hang_up(self, name: str) -> None:
        """After a call to `name`: its connection closed when the fleet is beyond the bound."""
        if self.beyond_bound:
            await self.workers[name].release()

    async def connect(self) -> None:
        """Wait up to --connect-timeout for the fleet, saying at once whom it awaits and,
        while it waits, who has answered. A quorum of workers must answer; the rest are
        named loudly, recorded in `absent`, and retried in the rounds with backoff. The
        evaluator never holds the start past the workers by more than a few seconds
        (a resumed run whose evaluator is down starts at once, not after the timeout):
        training goes on and evaluations are tried on schedule."""
        timeout = self.settings.connect_timeout
        awaited = ", ".join(f"{name} at {w.address}" for name, w in self.workers.items())
        evaluator = f"; evaluator at {self.evaluator.address}" if self.evaluator else ""
        self.say(f"Waiting up to {timeout:.0f}s for {len(self.workers)} workers: {awaited}{evaluator}")
        started = time.perf_counter()
        calls = {asyncio.ensure_future(w.info(timeout)): name for name, w in self.workers.items()}
        if self.evaluator:
            calls[asyncio.ensure_future(self.evaluator.info(timeout))] = _EVALUATOR
        try:
            evaluator_call = await self._await_workers(calls, started)
            await self._check_quorum()
            if evaluator_call is not None:
                await self._await_evaluator(evaluator_call)
        finally:
            for call in calls:
                call.cancel()
        fleet = self._agree()
        source = await self._first_weights(fleet)
        answered = len(self._infos)
        if self.absent:
            warning = (f"WARNING: going on with {answered} of {len(self.workers)} workers; not answering: "
                       + "; ".join(f"{n} at {self.workers[n].address} ({reason})" for n, reason in self.absent.items())
                       + ". They are asked again every round. To require the whole fleet: --min-workers all")
            self.say(warning)
            log.warning("%s", warning)
        else:
            self.say(f"Fleet ready after {time.perf_counter() - started:.2f}s: {answered} of {len(self.workers)} "
                      f"workers{' and the evaluator' if self._evaluator_info is not None else ''}")
        self.say(f"Running {fleet.describe()}; initial weights: {source}")
        await asyncio.gather(*(self.hang_up(name) for name in self.workers))
        if self._secure is not None:
            await self._secure.setup(self)
        log.info("fleet %s reference=%s digest=%s initial=%s", fleet.describe(), fleet.reference, fleet.digest,
                 source)

    def _agree(self) -> FleetModel:
        """Every worker that answered and the evaluator run this run's task, the same
        model and classes (fleet_model), or RunFailed naming both sides."""
        answered = [ServiceModel.of(name, self._infos[name]) for name in self.roster.names if name in self._infos]
        try:
            fleet = agree(self.settings.task, self.settings.model, answered)
            if self._evaluator_info is not None:
                fleet.check(ServiceModel.of(_EVALUATOR, self._evaluator_info, is_evaluator=True))
        except JetfedError as exc:
            raise RunFailed(f"the fleet disagrees: {exc}") from None
        self.fleet = fleet
        return fleet

    async def _first_weights(self, fleet: FleetModel) -> str:
        """The global model of round 1 (or of the round after a checkpoint), checked to
        be the fleet's, and each client told what its Train results must be; returns
        where the weights came from, for the start line."""
        if self._start is None:
            asked = [self.workers[name] for name in self.roster.names if name in self._infos]
            try:
                weights, source = await initial_weights.from_a_worker(
                    asked, fleet, self.settings.train.seed, self.settings.max_payload_bytes or MAX_PAYLOAD_BYTES,
                    self.settings.round_timeout)
            except JetfedError as exc:
                raise RunFailed(str(exc)) from None
            if not self._downlink.is_raw:
                source += await self._keep_initial(asked, weights)
        else:
            problem = self._start.problem(fleet)
            if problem:
                raise RunFailed(problem)
            weights, source = Weights.of(self._start.state, fleet.model), self._start.source
        spec = weights.manifest.tensors
        max_payload = self.settings.max_payload_bytes or stream.payload_limit(codec.payload_size_range(spec)[1])
        self._expected = (fleet.model, spec, max_payload)
        for worker in self.workers.values():
            worker.expect(*self._expected, downlink=self._downlink)
        self._weights = weights
        return source

    async def _keep_initial(self, asked: List[WorkerClient], weights: Weights) -> str:
        """With a compressed downlink, every answering worker builds the seeded initial
        model itself and keeps it (InitialWeights with keep), so round 1 sends each an
        empty delta instead of the whole model (for mnist-cnn and 40 rounds, a third of
        top-k 10%'s downlink bytes). A worker that cannot (too old, another build, no
        answer) gets the model whole, as before; the words for the start line."""
        kept = await asyncio.gather(
            *(worker.keep_initial(self.settings.train.seed, weights, self.settings.round_timeout) for worker in asked),
            return_exceptions=True)
        for worker, outcome in zip(asked, kept):
            if isinstance(outcome, BaseException):
                log.info("worker=%s keeps no initial weights (%s): its round 1 gets them whole", worker.name,
                         describe_failure(outcome) if isinstance(outcome, Failure) else outcome)
        held = sum(outcome is True for outcome in kept)
        return f" ({held} of {len(asked)} workers built them too: round 1 sends them a delta)"

    async def _await_workers(
        self, calls: Dict["asyncio.Future[Any]", str], started: float,
    ) -> Optional["asyncio.Future[Any]"]:
        """Until every worker has answered or failed, saying every few seconds whom it
        still awaits; the evaluator's call if it is still pending then."""
        timeout = self.settings.connect_timeout
        pending = set(calls)
        while any(calls[call] != _EVALUATOR for call in pending):
            done, pending = await asyncio.wait(pending, timeout=_REMIND_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
            for call in done:
                self._answered(calls[call], call)
            if pending and not done:
                self.say(f"Still waiting for {', '.join(sorted(calls[c] for c in pending))} "
                          f"({time.perf_counter() - started:.0f}s of {timeout:.0f}s); answered so far: "
                          f"{', '.join(sorted(self._infos)) or 'none'}")
        return next(iter(pending), None)

    async def _check_quorum(self) -> None:
        """Enough workers answered to run rounds, or RunFailed naming each silent one."""
        await self._explain_absent()
        answered = len(self._infos)
        if answered < self.settings.quorum:
            who = "none" if not answered else f"only {answered}"
            raise RunFailed(
                f"{who} of the {len(self.workers)} workers answered within {self.settings.connect_timeout:.0f}s and "
                f"this run needs {self.settings.quorum}: " + "; ".join(f"{n} at {self.workers[n].address}: {reason}"
                                                                        for n, reason in self.absent.items())
                + ". " + _UNREACHABLE_HINT
            )

    async def _await_evaluator(self, call: "asyncio.Future[info_pb2.GetInfoResponse]") -> None:
        """The evaluator's answer, if it comes within the grace after the workers."""
        done, _ = await asyncio.wait({call}, timeout=_EVALUATOR_GRACE_S)
        if done:
            self._answered(_EVALUATOR, call)
        else:
            self._evaluator_missing(f"no answer {_EVALUATOR_GRACE_S:.0f}s after the workers")

    def _evaluator_missing(self, reason: str) -> None:
        assert self.evaluator is not None
        log.warning("evaluator at %s unreachable at start (%s); training goes on, evaluations will be tried "
                    "on schedule", self.evaluator.address, reason)
        self.say(f"WARNING: the evaluator at {self.evaluator.address} did not answer ({reason}); training goes on, "
                 "evaluations are tried on schedule")

    def _answered(self, name: str, call: "asyncio.Future[info_pb2.GetInfoResponse]") -> None:
        """Record one GetInfo answer (or its failure) from the connect phase."""
        failure = call.exception()
        if name == _EVALUATOR:
            assert self.evaluator is not None
            if failure is not None:
                self._evaluator_missing(describe_failure(failure))
                return
            info = call.result()
            self._evaluator_info = info
            log.info("evaluator address=%s device=%s task=%s model=%s examples=%d", self.evaluator.address,
                     info.device, info.task or "-", info.model, info.dataset_size)
            return
        if failure is not None:
            self.absent[name] = describe_failure(failure)
            return
        answer = call.result()
        self._infos[name] = answer
        self.board.worker_answered(name)
        log.info("worker=%s address=%s device=%s task=%s model=%s examples=%d", name, self.workers[name].address,
                 answer.device, answer.task or "-", answer.model, answer.dataset_size)

    def _learn(self, name: str, info: info_pb2.GetInfoResponse) -> None:
        """A GetInfo answer heard after the start (a worker absent then, or one back
        after a failure, maybe restarted with other flags): kept only if the worker
        still runs the fleet's model (FleetMismatch, a failure of that worker's, not of
        the run, otherwise)."""
        if self.fleet is not None:
            self.fleet.check(ServiceModel.of(name, info))
        self._infos[name] = info

    async def _explain_absent(self) -> None:
        """A wait that times out only says DEADLINE_EXCEEDED; one quick call without
        waiting tells why (connection refused, handshake failed, unknown host)."""
        for name in self.absent:
            try:
                self._infos[name] = await self.workers[name].info(timeout=2.0, wait=False)
            except Failure as failure:
                self.absent[name] = f"never answered: {describe_failure(failure)}"
        for name in list(self.absent):
            if name in self._infos:
                del self.absent[name]
                self.board.worker_answered(name)
        for name, reason in self.absent.items():
            self.roster.failed(name, reason)
            self.board.worker_failed(name, reason)
            log.warning("worker=%s address=%s unreachable at start: %s", name, self.workers[name].address, reason)

    def _scores_updates(self, round_number: int) -> bool:
        """Whether this round's updates are scored one by one (evaluate_round)."""
        return (self.settings.score_updates and self.evaluator is not None and self._secure is None
                and self.settings.evaluates(round_number))

    async def _attempt(
        self, round_number: int, names: List[str], record: Dict[str, Any], hold_all: bool = False,
    ) -> "_Attempt":
        """Ask `names` to train, at most --max-concurrency calls in flight (each worker's
        deadline starts with its call, so none expires while it waits for a slot).

        A round asking no more workers than that bound (the default: no bound), or a
        strategy that needs every update at once, or `hold_all`, holds the updates that
        arrive and leaves screening and aggregation to train_round, as every release
        did. A mean-type strategy asking more folds each update into the step as it
        arrives (Strategy.begin) and drops it, so the coordinator holds at most the bound's
        updates in its calls plus the bound's loud ones awaiting the median (LoudHold):
        O(bound x model), whatever the number of workers. Bookkeeping (failures,
        rejections, successes) is done at the end in the order asked, as before."""
        settings = self.settings
        config = self.strategy.configure(round_number, replace(settings.train, lr=settings.lr_for(round_number)))
        self.board.start_round(round_number, names)
        sent = self.global_weights
        extras = self.strategy.companions(sent.state)
        if extras:  # encoded once per attempt, for every worker asked
            sent = Weights.of({**sent.state, **extras}, self.model)
        bound = settings.max_concurrency or len(names)
        streaming = self.strategy.streams and not hold_all and len(names) > bound
        keep = not streaming or self._scores_updates(round_number)
        base = self.global_weights.state
        gate = asyncio.Semaphore(max(bound, 1))
        attempt = _Attempt(step=self.strategy.begin(base) if streaming else None)
        hold = screening.LoudHold(base, settings.max_norm_ratio, len(names), bound) if streaming else None
        failures: Dict[str, JetfedError] = {}
        rejected: Dict[str, str] = {}
        heard: Dict[str, Update] = {}

        async def call(name: str) -> Update:
            """A slot is the call and its update until folded (released below), so the
            updates decoded and not yet folded never outnumber the bound; beyond the
            bound, so are the open connections (WorkerClient.release)."""
            await gate.acquire()
            try:
                update = await self.train_on(name, round_number, config, sent)
            except BaseException:
                gate.release()
                raise
            finally:
                await self.hang_up(name)
            return update

        def fold(ready: List[Tuple[str, StateDict]]) -> None:
            assert attempt.step is not None
            for worker, state in ready:
                attempt.step.add(Contribution(worker, state, heard[worker].num_examples, round_number - 1))

        def take(name: str, task: "asyncio.Future[Update]") -> None:
            """One finished call: its failure, or its update screened (and folded, when
            streaming). A function, so no local outlives it holding the update."""
            failure = task.exception()
            if failure is not None:
                if not isinstance(failure, JetfedError):
                    raise failure
                failures[name] = failure
                return
            update = task.result()
            gate.release()
            problem = self.claim_problem(update, config)
            if problem:
                rejected[name] = problem
                return
            norm = screening.delta_norm(update.weights.state, base)
            attempt.norms[name] = norm
            # Its figures only, when streaming and not scored: the weights go into the step.
            heard[name] = update if hold is None or keep else replace(update, weights=_FOLDED)
            if hold is not None:
                fold(hold.offer(name, update.weights.state, norm))

        calls = {asyncio.ensure_future(call(name)): name for name in names}
        try:
            while calls:
                done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                while done:  # a finished task holds its update: dropped once taken
                    finished = done.pop()
                    take(calls.pop(finished), finished)
                    del finished
        finally:
            for pending in calls:
                pending.cancel()
        if hold is not None:
            ready, attempt.clipped, attempt.lost_bets = hold.finish()
            fold(ready)
        for name in names:
            if name in failures:
                failure = failures[name]
                if isinstance(failure, Failure) and failure.kind is Kind.LATE:
                    record["late"].append(name)
                # It may come back restarted, with other data: ask its GetInfo again then.
                self._infos.pop(name, None)
                self._failed(round_number, name, describe_failure(failure), record)
        for name in names:
            if name in rejected:
                self._failed(round_number, name, rejected[name], record)
            elif name in heard:
                update = heard[name]
                attempt.updates.append(update)
                self.roster.succeeded(name, round_number)
                self.board.worker_done(name, round_number, update.train_seconds, update.mean_loss)
                record["failed"].pop(name, None)
        return attempt

    def _missed_quorum(self, round_number: int, updates: int, failed: Dict[str, str]) -> str:
        """Why the round failed. When every worker that failed refused this run because
        another coordinator's run holds it, that is the news, not the quorum: each
        refusal names both runs. `failed` is the last attempt's, which asked everyone."""
        settings = self.settings
        if failed and all(privacy.refused_for_budget(reason) for reason in failed.values()):
            return budget_spent(f"round {round_number}", settings, failed)
        if failed and all(refused_by_another_run(reason) for reason in failed.values()):
            return (f"round {round_number}: another coordinator is driving these workers, and they refuse this run "
                    f"(run {self._run_id}): " + "; ".join(f"{name}: {reason}" for name, reason in failed.items()))
        return (f"round {round_number}: {updates} updates after {settings.round_retries + 1} attempts, "
                f"the quorum is {settings.quorum}: {failed}")

    def claim_problem(self, update: Update, config: TrainConfig) -> Optional[str]:
        """Why `update`'s example count is impossible for `config` (screening), or None."""
        return screening.claim_problem(update.num_examples, config, self._infos[update.worker].dataset_size)

    def forget(self, name: str) -> None:
        """A worker that failed may come back restarted, with other data: its GetInfo is
        asked again before its next Train."""
        self._infos.pop(name, None)

    def adopt(self, weights: Weights, updates: List[Update]) -> None:
        """A driver's new global model, and the updates it came from (scored with it)."""
        self._weights = weights
        self._updates = updates

    def _failed(self, round_number: int, name: str, reason: str, record: Dict[str, Any]) -> None:
        record["failed"][name] = reason
        delay = self.roster.failed(name, reason)
        self.board.worker_failed(name, reason)
        log.warning("round=%d worker=%s status=%s retry_in=%.1fs", round_number, name, reason, delay)

    async def train_on(self, name: str, round_number: int, config: TrainConfig, weights: Weights) -> Update:
        """One worker's Train, timed as the coordinator sees it (both transfers included);
        a failed call is not a training time. A worker not heard from since its last
        failure (or since the start) is asked its GetInfo first, within the same
        deadline: the data set it announces bounds the examples it may claim."""
        started = time.perf_counter()
        deadline = self.settings.round_timeout
        if name not in self._infos:
            self._learn(name, await self.workers[name].info(timeout=deadline, wait=False))
        left = deadline - (time.perf_counter() - started)
        update = await self.workers[name].train(round_number, config, weights, left)
        self.telemetry.observe_train(name, time.perf_counter() - started)
        self.telemetry.observe_traffic(name, update.bytes_down, update.bytes_up, update.raw_down or update.bytes_down,
                                       update.raw_up or update.bytes_up)
        return update

    async def train_round(self, round_number: int) -> Dict[str, Any]:
        """One round: every due worker trains; the updates that arrive within the round's
        deadline with a possible example count are averaged, each change clipped to
        --max-norm-ratio times the median, if they reach the quorum. Otherwise the round
        is tried again (everyone asked, the global model untouched) up to
        --round-retries times. With --max-concurrency below the workers asked, the
        deadline is each call's: a round can last longer than --round-timeout while
        workers wait for a slot, none of them late for it."""
        settings = self.settings
        record: Dict[str, Any] = {"round": round_number, "lr": settings.lr_for(round_number), "failed": {}, "late": []}
        for attempt in range(1, settings.round_retries + 2):
            names = self.strategy.select(round_number, self.roster.due(everyone=attempt > 1))
            record["skipped"] = [n for n in self.roster.names if n not in names]
            if self._secure is not None:  # the masked updates' sum only (coordinator.secure_rounds)
                secure = await self._secure.attempt(self, round_number, names, record)
                record["secure_aggregation"] = secure.note
                outcome = _Attempt(updates=secure.updates)
            else:
                outcome = await self._attempt(round_number, names, record)
            if outcome.lost_bets:
                log.warning("round=%d: %d updates are over --max-norm-ratio x the median, more than the %d the "
                            "coordinator holds to scale them (--max-concurrency); asking again, holding every "
                            "update: %s", round_number, len(outcome.lost_bets), settings.max_concurrency,
                            ", ".join(outcome.lost_bets))
                outcome = await self._attempt(round_number, names, record, hold_all=True)
            updates, norms = outcome.updates, outcome.norms
            if len(updates) >= settings.quorum:
                break
            if attempt <= settings.round_retries:
                pause = min(0.5 * 2 ** (attempt - 1), settings.max_backoff)
                log.warning("round=%d attempt=%d quorum not met: %d of %d updates; retrying in %.1fs",
                            round_number, attempt, len(updates), settings.quorum, pause)
                await asyncio.sleep(pause)
        else:
            raise RunFailed(self._missed_quorum(round_number, len(updates), record["failed"]))
        clipped: Dict[str, str]
        if self._secure is not None:
            clipped = {}
            new_state = self._secure.step(self.strategy, self.global_weights.state, secure, round_number)
        elif outcome.step is None:
            states, clipped = screening.clip_to_bound({u.worker: u.weights.state for u in updates},
                                                      self.global_weights.state, norms, settings.max_norm_ratio)
            contributions = [Contribution(u.worker, states[u.worker], u.num_examples, round_number - 1)
                             for u in updates]
            new_state = self.strategy.aggregate(self.global_weights.state, contributions)
        else:
            clipped = {u.worker: outcome.clipped[u.worker] for u in updates if u.worker in outcome.clipped}
            new_state = outcome.step.finish()
        for name, why in clipped.items():
            log.warning("round=%d worker=%s clipped: %s", round_number, name, why)
        # Kept for evaluate_round only when it scores them: otherwise a round's updates
        # would stay in memory through the next round.
        self._updates = updates if self._scores_updates(round_number) else []
        self._weights = Weights.of(new_state, self.model)
        note = self.strategy.note()
        if note:
            record["strategy"] = note
        record.update({
            "attempts": attempt,
            "workers": [u.worker for u in updates],
            "clipped": clipped,
            "updates": {
                u.worker: {"num_examples": u.num_examples, "mean_loss": u.mean_loss,
                           "train_seconds": u.train_seconds, "device": u.device,
                           **({"delta_norm": norms[u.worker]} if u.worker in norms else {}),
                           **u.traffic(), **({"epsilon": u.epsilon, "delta": u.delta} if u.epsilon else {})}
                for u in updates
            },
        })
        if settings.train.private:  # DP-SGD: each worker's cumulative epsilon for the run, after this round
            record["privacy"] = {"delta": settings.train.dp_delta, "epsilon": {u.worker: u.epsilon for u in updates},
                                 "max_epsilon": max(u.epsilon for u in updates)}
        return record

    async def label_groups(self) -> List[report.LabelGroup]:
        """Groups of the workers known so far; one that was down at start is asked now."""
        for name in self.roster.names:
            if name not in self._infos:
                try:
                    self._learn(name, await self.workers[name].info(timeout=2.0, wait=False))
                except JetfedError:
                    pass
        return report.label_groups([list(self._infos[n].label_counts) for n in self.roster.names if n in self._infos])

    def round_models(self) -> List[Tuple[str, str, Weights]]:
        """What evaluate_round scores for the round just trained, as (key, who, weights):
        each update (with --score-updates), then the new global model. Taken as the
        round ends, since the next round replaces them while these are being scored."""
        updates = self._updates if self.settings.score_updates else []
        tagged = [(u.worker, f"Model update {u.worker}", u.weights) for u in updates]
        # The global model's chunks, serialized once for the next round's Train calls,
        # go to the evaluator as they are too.
        tagged.append(("global", "Federated model", self.global_weights))
        return tagged

    async def evaluate_round(
        self, round_number: int, models: List[Tuple[str, str, Weights]],
    ) -> Tuple[Dict[str, Score], List[str]]:
        """Score round `round_number`'s `models` (round_models), at most
        _CONCURRENT_EVALUATIONS at once, and return the scores with the console lines in
        the reference's order. The caller prints them when the round's turn comes: later
        rounds may be training meanwhile (coordinator.rounds)."""
        assert self.evaluator is not None
        timeout = self.settings.eval_timeout
        groups = await self.label_groups()
        if self._evaluation_slots is None:  # one bound for every round's evaluation at once
            self._evaluation_slots = asyncio.Semaphore(_CONCURRENT_EVALUATIONS)
        calls = [asyncio.ensure_future(self._evaluate(key, w, timeout, self._evaluation_slots)) for key, _, w in models]
        try:
            scores = await asyncio.gather(*calls)
        finally:  # one failed: the others would hold the evaluator's streams for nothing
            for call in calls:
                call.cancel()
        lines = ["Evaluating models"]
        for (_, who, _), score in zip(models, scores):
            lines += report.score_lines(who, score, groups)
        scored = {key: score for (key, _, _), score in zip(models, scores)}
        self.board.evaluated(round_number, scored)
        self.telemetry.set_evaluation(round_number, {key: s.metrics for key, s in scored.items()})
        return scored, lines

    async def _end_run(self) -> None:
        """EndRun on every worker at once, each within _END_RUN_TIMEOUT_S; a worker that is
        down, or too old to know EndRun (UNIMPLEMENTED), is only noted: it frees itself
        within twice the round interval."""
        names = list(self.workers)
        results = await asyncio.gather(*(self.workers[n].end_run(_END_RUN_TIMEOUT_S) for n in names),
                                       return_exceptions=True)
        freed = []
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                log.debug("run=%s worker=%s end of run not delivered: %s", self._run_id, name, describe_failure(result))
            elif result:
                freed.append(name)
        log.info("run=%s ended; workers freed: %s", self._run_id, ", ".join(freed) or "none")

    async def _evaluate(self, key: str, weights: Weights, timeout: float, limit: asyncio.Semaphore) -> Score:
        assert self.evaluator is not None
        async with limit:
            started = time.perf_counter()
            score = await self.evaluator.evaluate(key, weights, timeout)
        self.telemetry.observe_evaluate(key, time.perf_counter() - started)
        return score

    async def close(self) -> None:
        """End the run on every worker, then close the channels. Called however the run
        ends (finished, failed, stopped by a signal): a failed run frees the fleet too."""
        if self._run_id:
            await self._end_run()
        for worker in self.workers.values():
            await worker.close()
        if self.evaluator:
            await self.evaluator.close()
