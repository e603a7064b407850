"""The Worker servicer: logic only; transport lives in worker.cli."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple

import grpc
import torch

from jetfed import codec, compression, privacy, scaffold, wire
from jetfed.config import DEFAULT_MAX_EXAMPLES_PER_ROUND, TrainConfig
from jetfed.errors import InvalidConfig, ManifestMismatch, StreamStalled, TrainingStopped, WorkerStateError
from jetfed.scaffold import CONTROL_PREFIX, ControlStore, ControlVariates
from jetfed.scoring import Scorer
from jetfed.serving import RunningServer
from jetfed.status import rpc_status
from jetfed.stream import Received
from jetfed.tasks.base import Examples, Task, TrainOutcome
from jetfed.telemetry import Telemetry
from jetfed.training import derive_seed
from jetfed.v1 import evaluation_pb2, info_pb2, secagg_pb2, worker_pb2, worker_pb2_grpc
from worker.residual import ResidualStore
from worker.secagg_service import SecAggWorker
from worker.rounds import Round, RunLedger, TrainingSlot

log = logging.getLogger(__name__)

# A caller gets this long to send a complete header; until it has, it holds nothing.
# Seconds, not the --receive-timeout for the whole model: a header is a few kilobytes.
HEADER_TIMEOUT_S = 10.0
MAX_ROUND = 2**32 - 1  # what TrainResult.round carries back
# On shutdown, how long a round told to stop may take to let its call end (one batch).
SHUTDOWN_WAIT_S = 5.0
SLOWDOWN_SETTING = "--slowdown"
MAX_SLOWDOWN = 1000.0


def slowdown_factor(value: float) -> float:
    """A worker's --slowdown, checked once at start-up: 1 is this board's own speed."""
    if not (math.isfinite(value) and 1 <= value <= MAX_SLOWDOWN):
        raise InvalidConfig(f"{SLOWDOWN_SETTING}: {value} must be a finite number in [1, {MAX_SLOWDOWN:g}] "
                            "(1 = this board's own speed; 4 = a board four times slower)")
    return value


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Trains one round at a time on data that never leaves the process.

    The model instance stays warm between rounds; each Train loads the incoming global
    weights into it, so every round starts from the coordinator's model, never from this
    worker's previous update.

    A Train holds the worker from its complete, valid header until its training thread
    is done. A round whose call ends first (cancelled, past its deadline, or cut by
    shutdown) is told to stop at its next batch; until its thread has stopped, health
    says NOT_SERVING and a new Train is ABORTED. Health does not flip while a round is
    merely in progress: a busy worker answers ABORTED and takes the next round, and a
    health check that flapped every round would make launchers and coordinators think
    it went away. NOT_SERVING means work is running that nobody will collect.

    `slowdown` > 1 emulates a board that many times slower, for straggler benchmarks
    (real fleets mix board generations): after training, the call sleeps (slowdown - 1)
    times the training's measured seconds on the event loop, holding the worker as a
    slower board would, and reports the whole as train_seconds. The sleep is the
    call's, so a cancelled call or one past its deadline ends it at once.

    A SCAFFOLD round (config.scaffold) brings the server's control variate after the
    model's tensors (jetfed.scaffold); the worker trains with its own c_i from
    `control_store`, and keeps the next c_i there once the whole result has been handed
    to its caller, so a call that ends without its result leaves the stored c_i as the
    coordinator last knew it. Without a store, SCAFFOLD rounds are refused.

    A DP-SGD round (config.noise_multiplier > 0, jetfed.privacy) is refused at its
    header when this worker lacks opacus or a `ledger`, or when it would take the run's
    epsilon over config.epsilon_budget; once trained, its spend is written to the
    ledger before any of the result leaves, and the result carries the run's epsilon.
    """

    def __init__(
        self, name: str, task: Task, data: Examples, *, device_label: str, executor: Executor, chunk_bytes: int,
        max_payload_bytes: int, receive_timeout: float = 120.0, telemetry: Optional[Telemetry] = None,
        max_examples_per_round: int = DEFAULT_MAX_EXAMPLES_PER_ROUND, slowdown: float = 1.0,
        control_store: Optional[ControlStore] = None, residual_store: Optional[ResidualStore] = None,
        ledger: Optional[privacy.Ledger] = None,
    ) -> None:
        """`residual_store` keeps top-k's error feedback (worker.residual); by default
        beside the control store's files, in memory without one."""
        self._name = name
        self._task = task
        self._model_name = task.model_name
        self._model = task.build_model().to(data.device)
        self._spec = codec.spec_of(self._model.state_dict())
        self._scaffold_spec = scaffold.train_spec(self._model.state_dict())
        self._controls = control_store
        self._ledger = ledger
        # The global model of the last Train, whole, by id: what a delta from the
        # coordinator (WeightManifest content DELTA) is added to. In memory only: a
        # restarted worker refuses a delta, and its coordinator sends full weights.
        self._holding: Optional[compression.Held] = None
        self._residuals = residual_store or ResidualStore(
            control_store.folder if control_store is not None else None, task.model_name)
        self._task_takes_controls = scaffold.takes_controls(task)
        # Secure aggregation's keys per run; its key epochs beside the control store's files.
        self._secagg = SecAggWorker(name, control_store.folder if control_store is not None else None)
        self._data = data
        self._device_label = device_label
        self._executor = executor
        self._chunk_bytes = chunk_bytes
        self._max_payload_bytes = max_payload_bytes
        self._receive_timeout = receive_timeout
        self._max_examples = max_examples_per_round
        self._slowdown = slowdown_factor(slowdown)
        self._training = TrainingSlot(name)
        self._runs = RunLedger(name)
        self._stopping: Optional[asyncio.Task] = None  # held, so the loop does not collect it
        self._health: Optional[RunningServer] = None
        self._telemetry = telemetry or Telemetry()
        self._scorer = Scorer(task, data, device_label, executor, max_payload_bytes,
                              receive_timeout=receive_timeout, telemetry=self._telemetry)

    def report_health_through(self, running: RunningServer) -> None:
        """Let health say NOT_SERVING while an abandoned round stops (see the class)."""
        self._health = running

    async def GetInfo(self, request: info_pb2.GetInfoRequest, context: grpc.aio.ServicerContext) -> info_pb2.GetInfoResponse:
        return self._scorer.info(self._name, "worker")

    async def Train(
        self, request_iterator: AsyncIterator[worker_pb2.TrainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TrainResponse]:
        async with rpc_status(context, "Train"):
            held, head, manifest, payload = await self._receive(request_iterator, context)
            try:
                config = wire.config_from_proto(head.config)
                received = codec.decode_finite(manifest, payload, payload.sha256)
                holding = compression.received_weights(
                    self._holding, manifest.content, compression.Encoding(manifest.encoding, manifest.topk_fraction),
                    manifest.base_sha256, manifest.sha256, received,
                    self._scaffold_spec if config.scaffold else self._spec,
                )
                codec.require_finite(holding.state)
                self._holding = holding
                state = holding.state
                state, server_control = scaffold.split_controls(state) if config.scaffold else (state, None)
                seed = derive_seed(config.seed, head.round, self._name)
                outcome, compute_seconds = await self._train_until_abandoned(held, state, config, seed, server_control)
                outcome = await self._as_slower_board(head.round, outcome, compute_seconds)
                masked: Optional[secagg_pb2.SecAggMaskedInput] = None
                if head.HasField("secagg"):  # only the masked update leaves: never the weights
                    residual = None
                    result_manifest, result_payload, masked = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._secagg.masked_result, held.run_id, head.secagg, state, outcome.state,
                        outcome.num_examples, self._model_name,
                    )
                else:
                    result_manifest, result_payload, residual = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._encoded_result, held, head, config, state, holding.id, outcome,
                    )
                epsilon = await self._spend_privacy(held, head, config, outcome) if config.private else 0.0
                for message in self._result_messages(head, outcome, result_manifest, result_payload, epsilon, masked):
                    yield message
                if residual is not None:
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._residuals.save, held.run_id, held.number, residual,
                    )
                if outcome.client_control is not None and self._controls is not None:
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._controls.save, held.run_id, held.number, outcome.client_control,
                    )
            finally:
                self._runs.ended(held.run_id)
                if not held.outlives_call:
                    self._training.release(held)

    async def EndRun(self, request: worker_pb2.EndRunRequest, context: grpc.aio.ServicerContext) -> worker_pb2.EndRunResponse:
        """A coordinator whose run has ended frees the worker for the next run at once.
        Coordinator-only like Train (jetfed.auth guards every method but GetInfo)."""
        async with rpc_status(context, "EndRun"):
            return worker_pb2.EndRunResponse(released=self._runs.release(request.run_id))

    async def SecAggAdvertise(self, request: secagg_pb2.SecAggAdvertiseRequest,
                              context: grpc.aio.ServicerContext) -> secagg_pb2.SecAggAdvertiseResponse:
        """Secure aggregation's keys for a run (worker.secagg_service); coordinator-only."""
        async with rpc_status(context, "SecAggAdvertise"):
            return await asyncio.get_running_loop().run_in_executor(None, self._secagg.advertise, request)

    async def SecAggShareKeys(self, request: secagg_pb2.SecAggShareKeysRequest,
                              context: grpc.aio.ServicerContext) -> secagg_pb2.SecAggShareKeysResponse:
        async with rpc_status(context, "SecAggShareKeys"):
            return self._secagg.share_keys(request)

    async def SecAggUnmask(self, request: secagg_pb2.SecAggUnmaskRequest,
                           context: grpc.aio.ServicerContext) -> secagg_pb2.SecAggUnmaskResponse:
        async with rpc_status(context, "SecAggUnmask"):
            return self._secagg.unmask(request)

    async def _receive(
        self, requests: AsyncIterator[worker_pb2.TrainRequest], context: grpc.aio.ServicerContext,
    ) -> Tuple[Round, Any, codec.Manifest, Received]:
        """Read a Train stream, taking the worker only once its header is complete and
        valid: a refused header (busy worker included) costs its caller the rest of its
        upload, read unbuffered, so the refusal reaches a client that was still writing
        with its own code (wire._discard), and an idle or refused caller holds nothing."""
        claimed: List[Round] = []

        def accept(head: worker_pb2.TrainHeader, manifest: codec.Manifest) -> None:
            self._check_header(head, manifest)
            self._runs.check(head.run_id)
            claimed.append(self._training.claim(head.round, head.run_id))
            self._runs.started(head.run_id, context.peer())

        try:
            head, manifest, payload = await wire.read_weight_stream(
                _header_within(requests, HEADER_TIMEOUT_S), "header", self._max_payload_bytes,
                self._receive_timeout, accept, self._telemetry.on_bytes_received("Train"),
            )
        except BaseException:
            for held in claimed:
                self._runs.ended(held.run_id)
                self._training.release(held)
            raise
        return claimed[0], head, manifest, payload

    def _check_header(self, head: worker_pb2.TrainHeader, manifest: codec.Manifest) -> None:
        """Refuse a bad or oversized config or another model's weights before their bytes arrive."""
        if head.round > MAX_ROUND:
            raise InvalidConfig(f"round: {head.round} must be in 0..{MAX_ROUND}")
        config = wire.config_from_proto(head.config)
        config.require_work_within(len(self._data), self._max_examples)
        self._check_weights(manifest, config.scaffold)
        if head.HasField("secagg"):
            self._secagg.check_round(head.run_id, head.secagg, config.scaffold)
        if config.private:
            privacy.require_library()
            if self._ledger is None:
                raise WorkerStateError("config.noise_multiplier: this worker keeps no privacy ledger (it was built "
                                       "without one); start it with jetfed worker, whose --state-dir gives one")
            self._ledger.check_budget(head.run_id, privacy.round_spend(head.round, config, len(self._data)), config)

    async def _spend_privacy(self, held: Round, head: worker_pb2.TrainHeader, config: TrainConfig,
                             outcome: TrainOutcome) -> float:
        """Write a DP round's spend to the ledger, durably, before its result leaves;
        the run's epsilon after it. A task loop that did not apply DP-SGD releases nothing."""
        if not outcome.private:
            raise privacy.PrivacyUnavailable(
                f"config.noise_multiplier: task {self._task.name}'s own training loop does not apply DP-SGD; "
                "its result is not released (use jetfed.training.train_round, or train without DP)")
        assert self._ledger is not None
        spend = privacy.round_spend(head.round, config, len(self._data))
        spends = await asyncio.get_running_loop().run_in_executor(self._executor, self._ledger.record, held.run_id,
                                                                   spend)
        epsilon = privacy.epsilon_of(spends, config.dp_delta)
        log.info("train round=%d run=%s dp epsilon=%.4f delta=%g (%s)", head.round, head.run_id or "-", epsilon,
                 config.dp_delta, privacy.describe(config))
        return epsilon

    def _check_weights(self, manifest: codec.Manifest, scaffold_round: bool) -> None:
        """The served model's tensors; in a SCAFFOLD round, the server's control variate too."""
        carries_controls = any(t.name.startswith(CONTROL_PREFIX) for t in manifest.tensors)
        if scaffold_round and self._controls is None:
            raise WorkerStateError("config.scaffold: this worker keeps no SCAFFOLD state (it was built without a "
                                   "control store); start it with jetfed worker, whose --state-dir gives one")
        if scaffold_round and not carries_controls:
            raise ManifestMismatch(
                f"config.scaffold: the weights hold no {CONTROL_PREFIX} tensors; a SCAFFOLD round's weights are the "
                f"model's tensors followed by the server control variate, {CONTROL_PREFIX}<name> for each of the "
                f"model's {len(self._scaffold_spec) - len(self._spec)} floating tensors"
            )
        if carries_controls and not scaffold_round:
            raise ManifestMismatch(f"manifest.tensors: {CONTROL_PREFIX} tensors (SCAFFOLD's server control variate) "
                                   "come only with config.scaffold; set it, or send the model alone")
        spec = self._scaffold_spec if scaffold_round else self._spec
        if manifest.content == compression.DELTA and (self._holding is None
                                                      or self._holding.id != manifest.base_sha256):
            raise compression.UnknownBase(
                f"manifest.base_sha256: a delta from weights '{manifest.base_sha256[:16]}' (round "
                f"{manifest.base_round}), but this worker holds "
                f"{repr(self._holding.id[:16]) if self._holding else 'none'}; send full weights")
        encoding = compression.Encoding(manifest.encoding, manifest.topk_fraction)
        codec.check_manifest(manifest, self._model_name, compression.payload_spec(spec, encoding))

    async def _train_until_abandoned(
        self, held: Round, state: codec.StateDict, config: TrainConfig, seed: int,
        server_control: Optional[codec.StateDict] = None,
    ) -> Tuple[TrainOutcome, float]:
        """Train in the torch thread. If this call ends first, the round is abandoned:
        it stops at its next batch and keeps the worker until its thread is done."""
        training = asyncio.get_running_loop().run_in_executor(
            self._executor, self._train, state, config, seed, held, server_control
        )
        try:
            return await asyncio.shield(training)
        finally:
            if not training.done():
                if held.abandon():
                    log.warning("train round=%d run=%s abandoned by its caller; stopping at the next batch",
                                held.number, held.run_id or "-")
                held.outlives_call = True
                self._stopping = asyncio.ensure_future(self._release_when_stopped(held, training))

    async def _as_slower_board(self, round_number: int, outcome: TrainOutcome, compute_seconds: float) -> TrainOutcome:
        """Sleep out the rest of a slower board's round (see the class); `outcome` as is at 1."""
        if self._slowdown == 1.0:
            return outcome
        emulated = (self._slowdown - 1) * compute_seconds
        log.info("train round=%d computed=%.3fs emulated=%.3fs slowdown=%g", round_number, compute_seconds, emulated,
                 self._slowdown)
        await asyncio.sleep(emulated)
        return dataclasses.replace(outcome, seconds=outcome.seconds + emulated)

    async def _release_when_stopped(self, held: Round, training: "asyncio.Future[Tuple[TrainOutcome, float]]") -> None:
        """Keep the worker, with health NOT_SERVING, until the abandoned round's thread is done."""
        if self._health is not None:
            await self._health.mark_not_serving()
        await asyncio.wait([training])
        if not training.cancelled():
            training.exception()  # retrieved: TrainingStopped, or a round that finished unawaited
        self._training.release(held)
        if self._health is not None:
            await self._health.mark_serving()

    async def stop_training(self, within: float = SHUTDOWN_WAIT_S) -> None:
        """Once the server has stopped: a round still running stops at its next batch,
        so the process can exit, and its call is let end (within `within` seconds) rather
        than cut off by the event loop's teardown."""
        held = self._training.held
        if held is None:
            return
        if held.abandon():
            log.warning("train round=%d run=%s stopping at the next batch: the worker is shutting down",
                        held.number, held.run_id or "-")
        try:
            await asyncio.wait_for(self._training.wait_free(), within)
        except asyncio.TimeoutError:
            log.warning("train round=%d still running %.0fs after shutdown began", held.number, within)

    def _encoded_result(
        self, held: Round, head: worker_pb2.TrainHeader, config: TrainConfig, base: codec.StateDict,
        base_id: str, outcome: TrainOutcome,
    ) -> Tuple[codec.Manifest, codec.Payload, Optional[codec.StateDict]]:
        """The result's manifest and payload as config.uplink_encoding asks: the full
        weights (raw), or their difference from `base` (the model this Train carried,
        whose id is `base_id`) encoded; with top-k, also the residual to
        keep once the result is sent (None otherwise)."""
        encoding = compression.Encoding.parse(config.uplink_encoding)
        if encoding.is_raw:
            manifest, payload = codec.encode(outcome.state, self._model_name)
            return manifest, payload, None
        owed = self._residuals.load(held.run_id, held.number, base) if encoding.kind == compression.TOPK else None
        encoded = compression.encode_delta(outcome.state, base, encoding, owed)
        manifest, payload = codec.encode(encoded.payload, self._model_name)
        manifest = dataclasses.replace(
            manifest, content=compression.DELTA, encoding=encoding.kind, topk_fraction=encoding.fraction,
            base_sha256=base_id, base_round=head.round,
        )
        return manifest, payload, encoded.residual

    def _result_messages(
        self, head: worker_pb2.TrainHeader, outcome: TrainOutcome, result_manifest: codec.Manifest,
        result_payload: codec.Payload, epsilon: float = 0.0,
        masked: Optional[secagg_pb2.SecAggMaskedInput] = None,
    ) -> Iterator[worker_pb2.TrainResponse]:
        log.info(
            "train round=%d run=%s examples=%d loss=%.4f seconds=%.3f",
            head.round, head.run_id or "-", outcome.num_examples, outcome.mean_loss, outcome.seconds,
        )
        result = worker_pb2.TrainResult(
            round=head.round, worker=self._name, num_examples=outcome.num_examples,
            mean_loss=outcome.mean_loss, train_seconds=outcome.seconds,
            device=self._device_label, manifest=wire.manifest_to_proto(result_manifest),
            epsilon=epsilon, delta=head.config.dp_delta if epsilon else 0.0, secagg=masked,
        )
        return wire.weight_messages(
            worker_pb2.TrainResponse(result=result), result_payload, self._chunk_bytes,
            on_bytes=self._telemetry.on_bytes_sent("Train"),
        )

    async def Evaluate(
        self, request_iterator: AsyncIterator[evaluation_pb2.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> evaluation_pb2.EvaluateResponse:
        async with rpc_status(context, "Evaluate"):
            return await self._scorer.score(request_iterator)

    async def InitialWeights(
        self, request: worker_pb2.InitialWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.InitialWeightsResponse]:
        """The task's model freshly built from `request.seed`: the start of a run whose
        coordinator has no task code and no --init-weights. Built in the torch thread,
        so it waits for a round in progress rather than racing it."""
        async with rpc_status(context, "InitialWeights"):
            loop = asyncio.get_running_loop()
            manifest, payload, state = await loop.run_in_executor(self._executor, self._initial_weights, request.seed)
            if request.keep:
                # Held as a full Train's weights would be: a first Train may send a delta from them.
                self._holding = compression.Held(manifest.sha256, state)
                log.info("initial weights seed=%d model=%s sha256=%s kept as the next delta's base peer=%s",
                         request.seed, self._model_name, manifest.sha256[:16], context.peer())
                yield worker_pb2.InitialWeightsResponse(header=worker_pb2.InitialWeightsHeader(
                    manifest=wire.manifest_to_proto(manifest), kept=True))
                return
            log.info("initial weights seed=%d model=%s bytes=%d peer=%s", request.seed, self._model_name,
                     manifest.total_bytes, context.peer())
            head = worker_pb2.InitialWeightsResponse(
                header=worker_pb2.InitialWeightsHeader(manifest=wire.manifest_to_proto(manifest))
            )
            for message in wire.weight_messages(
                head, payload, self._chunk_bytes, on_bytes=self._telemetry.on_bytes_sent("InitialWeights"),
            ):
                yield message

    def _initial_weights(self, seed: int) -> Tuple[codec.Manifest, bytes, codec.StateDict]:
        """The torch thread's part, as the coordinator once built the start itself
        (`torch.manual_seed(seed)`, then the model, on the CPU): the same seed gives the
        same bytes on every board, CUDA or not. fork_rng puts the CPU generator back
        afterwards (training seeds torch each round anyway)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = self._task.build_model().state_dict()
        manifest, payload = codec.encode(state, self._model_name)
        return manifest, payload, state

    def warm_up(self) -> None:
        """Pay torch's first-call costs (kernel selection, allocator growth) at start-up,
        not in round 1; the weights are overwritten by the first Train anyway. Only the
        training path: no round waits on this worker's own Evaluate, and warming it took
        a scoring batch's activations (~50 MB of peak memory for mnist-cnn)."""
        self._task.train(self._model, self._data, TrainConfig(batch_size=32, max_batches=1), seed=0)

    def _train(
        self, state: codec.StateDict, config: TrainConfig, seed: int, held: Round,
        server_control: Optional[codec.StateDict],
    ) -> Tuple[TrainOutcome, float]:
        """The torch thread's part: the outcome and the training's wall seconds, measured
        here since a custom loop may report none; says how soon a round told to stop did."""
        extra: Dict[str, ControlVariates] = {}
        if server_control is not None and self._controls is not None:
            if self._task_takes_controls:
                client = self._controls.load(held.run_id, held.number, server_control)
                extra["controls"] = ControlVariates(server_control, client)
            else:
                log.warning("train round=%d run=%s: task %s's own training loop takes no SCAFFOLD controls: "
                            "this round trains uncorrected", held.number, held.run_id or "-", self._task.name)
        self._model.load_state_dict(state)
        started = time.perf_counter()
        try:
            outcome = self._task.train(self._model, self._data, config, seed, held.stop, **extra)
            return outcome, time.perf_counter() - started
        except TrainingStopped:
            assert held.abandoned_at is not None
            log.info("train round=%d run=%s stopped %.3fs after it was abandoned", held.number, held.run_id or "-",
                     time.monotonic() - held.abandoned_at)
            raise


async def _header_within(messages: AsyncIterator[Any], seconds: float) -> AsyncIterator[Any]:
    """`messages`, whose first must arrive within `seconds` (StreamStalled otherwise)."""
    iterator = messages.__aiter__()
    try:
        first = await asyncio.wait_for(iterator.__anext__(), seconds)
    except StopAsyncIteration:
        return
    except asyncio.TimeoutError:
        raise StreamStalled(f"header: no complete header within {seconds:.0f}s of the call's start") from None
    yield first
    async for message in iterator:
        yield message
