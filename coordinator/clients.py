"""Typed clients for the worker and evaluator services: the gRPC proxies of the round
loop. Protobuf and gRPC stop here: the loop sees plain objects, and every failed call
as a coordinator.failures.Failure."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import grpc

from coordinator.failures import Failure
from jetfed import codec, compression, wire
from jetfed.auth import await_admission
from jetfed.codec import Manifest, StateDict, TensorInfo
from jetfed.config import TrainConfig
from jetfed.errors import BadStream, ManifestMismatch
from jetfed.serving import CHANNEL_OPTIONS
from jetfed.telemetry import Telemetry

from jetfed.v1 import (
    evaluation_pb2,
    evaluator_pb2_grpc,
    info_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

log = logging.getLogger(__name__)

# A worker that reboots is reconnected within seconds, not after gRPC's default
# backoff of up to two minutes.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5000),
]

Metadata = Tuple[Tuple[str, str], ...]
TRAIN_METHOD = "/jetfed.v1.Worker/Train"
EVALUATE_METHOD = "/jetfed.v1.Evaluator/Evaluate"


def _channel(address: str, credentials: Optional[grpc.ChannelCredentials]) -> grpc.aio.Channel:
    """TLS when the coordinator has credentials (jetfed.tls), plaintext otherwise."""
    options = CHANNEL_OPTIONS + RECONNECT_OPTIONS
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


async def _send(call, messages: Iterable, guarded: bool) -> None:
    """Stream `messages` into `call`; into a guarded service (TLS or a token) only once it
    has admitted the call, so a refusal arrives with its own code, not as INTERNAL."""
    if guarded:
        await await_admission(call)
    for message in messages:
        await call.write(message)
    await call.done_writing()


@dataclass(frozen=True)
class Weights:
    """A state_dict with its serialized form, so a model is encoded once and can be sent
    to many peers (and a worker's update re-sent to the evaluator) as it arrived.

    A received payload's tensors map its bytes (codec.decode): treat `state` and
    `payload` as read-only. `chunks` keeps the payload's chunk messages serialized, per
    chunk size, once a model is sent to a worker: the global model is split and
    serialized once per version, not once per worker (at the cost of a second copy of
    its bytes while it is the global model)."""

    manifest: Manifest
    payload: codec.Payload
    # Equal payloads are equal models (the manifest names its SHA-256); tensors do not compare as a bool.
    state: StateDict = field(compare=False)
    _chunks: Dict[int, wire.SerializedChunks] = field(default_factory=dict, compare=False, repr=False)
    _deltas: Dict[Tuple[str, compression.Encoding, int], "Downlink"] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, state: StateDict, model: str) -> "Weights":
        """`state` encoded; the Weights' tensors then map the payload (as a received
        one's do), so a new global model is held once as tensors-and-bytes, not as
        `state` beside its payload (the caller drops `state`)."""
        manifest, payload = codec.encode(state, model)
        return cls(manifest, payload, codec.decode(manifest, payload, manifest.sha256))

    def chunks(self, chunk_bytes: int) -> wire.SerializedChunks:
        """The payload as serialized chunk messages of `chunk_bytes`, made on first use."""
        if chunk_bytes not in self._chunks:
            self._chunks[chunk_bytes] = wire.serialized_chunks(self.payload, chunk_bytes)
        return self._chunks[chunk_bytes]

    def cached_chunks(self, chunk_bytes: int) -> Optional[wire.SerializedChunks]:
        return self._chunks.get(chunk_bytes)

    def held(self) -> compression.Held:
        """These weights as a worker holds them once sent whole."""
        return compression.Held(self.manifest.sha256, self.state)

    def delta_from(self, base: compression.Held, encoding: compression.Encoding, chunk_bytes: int) -> "Downlink":
        """These weights as a delta from `base`, encoded, and what a worker holding
        `base` holds once it has applied it. Made once per base, encoding and chunk
        size (the workers of a round mostly hold the same base: one shared object),
        the newest few kept."""
        key = (base.id, encoding, chunk_bytes)
        if key not in self._deltas:
            payload_state = compression.encode(compression.delta(self.state, base.state), encoding)
            manifest, payload = codec.encode(payload_state, self.manifest.model)
            manifest = replace(manifest, content=compression.DELTA, encoding=encoding.kind,
                               topk_fraction=encoding.fraction, base_sha256=base.id)
            holding = compression.received_weights(base, compression.DELTA, encoding, base.id, manifest.sha256,
                                                   payload_state, codec.spec_of(self.state))
            while len(self._deltas) >= MAX_DELTAS_KEPT:
                del self._deltas[next(iter(self._deltas))]
            self._deltas[key] = Downlink(manifest, wire.serialized_chunks(payload, chunk_bytes), holding)
        return self._deltas[key]


def downlink_for(weights: Weights, holding: Optional[compression.Held], encoding: compression.Encoding,
                 chunk_bytes: int) -> Downlink:
    """What a Train sends a worker that holds `holding` (None: nothing known): the
    global model whole, or as a delta from `holding` when the run's downlink encoding
    is not raw and the worker's weights are of the same tensors (an empty delta when
    it holds the global model itself: round 1 after keep_initial, a round that failed)."""
    if encoding.is_raw or holding is None or codec.spec_of(holding.state) != weights.manifest.tensors:
        return Downlink(weights.manifest, weights.chunks(chunk_bytes), weights.held())
    return weights.delta_from(holding, encoding, chunk_bytes)


# Downlink deltas a global model keeps (Weights.delta_from): the bases its workers hold.
MAX_DELTAS_KEPT = 4


@dataclass(frozen=True)
class Downlink:
    """A Train's payload as sent: its manifest, its serialized chunks, and the weights
    the worker holds once it has them (the base of the update it answers with)."""

    manifest: Manifest
    chunks: wire.SerializedChunks
    holding: compression.Held


@dataclass(frozen=True)
class Update:
    """A worker's trained weights, always whole (a compressed update is decoded back
    onto the model it was trained from before anything else sees it), and what the
    round moved: `bytes_down` the Train's payload, `bytes_up` the result's, as they
    crossed the wire, and `raw_down`, `raw_up` what they would have been full and raw
    (0: as crossed, or not counted)."""

    worker: str
    weights: Weights
    num_examples: int
    mean_loss: float
    train_seconds: float
    device: str
    bytes_down: int = 0
    bytes_up: int = 0
    raw_down: int = 0
    raw_up: int = 0
    # A DP-SGD round's (TrainConfig.noise_multiplier > 0): the worker's cumulative
    # (epsilon, delta) for the run, as its accountant reports it; 0 without DP.
    epsilon: float = 0.0
    delta: float = 0.0

    def traffic(self) -> Dict[str, float]:
        """For metrics.jsonl: bytes sent to and received from the worker this round, and
        the compression ratio of the two together against full raw weights both ways."""
        raw = (self.raw_down or self.bytes_down) + (self.raw_up or self.bytes_up)
        moved = self.bytes_down + self.bytes_up
        return {"bytes_sent": self.bytes_down, "bytes_received": self.bytes_up,
                "compression_ratio": raw / moved if moved else 1.0}


def _plain(manifest: Manifest) -> bool:
    return manifest.content == compression.FULL and manifest.encoding == compression.RAW


def check_result_manifest(manifest: Manifest, model: str, spec: Tuple[TensorInfo, ...],
                          asked: compression.Encoding, base_sha256: str, who: str) -> None:
    """A Train result's manifest, before its bytes: full raw weights of `spec` (always
    accepted: what a worker that ignores uplink_encoding sends), or tensors encoded as
    `asked`, a delta being from the weights the Train carried (`base_sha256`)."""
    if _plain(manifest):
        codec.check_manifest(manifest, model, spec)
        return
    encoding = compression.Encoding(manifest.encoding, manifest.topk_fraction)
    if encoding != asked:
        raise BadStream(f"manifest.encoding: worker {who} sent {encoding}, but this run asked for {asked} "
                        "(or full raw weights)")
    if manifest.content == compression.DELTA and manifest.base_sha256 != base_sha256:
        raise ManifestMismatch(f"manifest.base_sha256: worker {who} sent a delta from weights "
                               f"'{manifest.base_sha256[:16]}', not from the '{base_sha256[:16]}' this Train sent")
    codec.check_manifest(manifest, model, compression.payload_spec(spec, encoding))


def rebuild(manifest: Manifest, payload: codec.Payload, received: StateDict, holding: compression.Held,
            sent: Weights, spec: Tuple[TensorInfo, ...], model: str, who: str) -> Weights:
    """The whole trained weights a checked result carried, as the strategies must see
    them: the global model `sent` plus what the worker's training changed. The worker
    trained from `holding` (the global model itself, or what a lossy downlink delta
    rebuilt); its change is added to `sent`, so what the downlink did not carry stays
    in the global model (and goes in the next round's delta) instead of being lost.
    Full raw weights trained from `sent` itself are taken as they are."""
    exact = holding.id == sent.manifest.sha256
    if manifest.content == compression.FULL and manifest.encoding == compression.RAW and exact:
        return Weights(manifest, payload, received)
    tensors = compression.decode(received, spec, compression.Encoding(manifest.encoding, manifest.topk_fraction))
    if manifest.content == compression.FULL:
        tensors = compression.delta(tensors, holding.state)
    tensors = compression.apply_delta(sent.state, tensors)
    codec.require_finite(tensors, who)
    return Weights.of(tensors, model)


@dataclass(frozen=True)
class Score:
    """One model's evaluation. `metrics` is the task's named metrics, what the run
    records and shows; the counts serve the reference's console lines and are 0 for a
    task that does not classify. Built without metrics (an evaluator older than tasks
    sends none), it derives loss and accuracy from the counts, so every reader finds
    a map."""

    correct: int
    total: int
    loss: float
    predicted_counts: Tuple[int, ...]
    metrics: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            derived = {"loss": self.loss}
            if self.total:
                derived["accuracy"] = self.correct / self.total
            object.__setattr__(self, "metrics", derived)

    @property
    def classifies(self) -> bool:
        """Whether the evaluation counted right and wrong answers (a classification task)."""
        return self.total > 0

    @property
    def accuracy(self) -> float:
        if self.total:
            return self.correct / self.total
        return float(self.metrics.get("accuracy", 0.0))


def _score(response: evaluation_pb2.EvaluateResponse) -> Score:
    return Score(response.correct, response.total, response.loss, tuple(response.predicted_counts),
                 dict(response.metrics))


def _evaluate_messages(tag: str, weights: Weights, chunk_bytes: int, on_bytes: Callable[[int], None]):
    """The global model's chunks as serialized for the workers; an update's made as
    they are sent (an update is evaluated once: keeping its chunks would double it)."""
    head = evaluation_pb2.EvaluateRequest(
        header=evaluation_pb2.EvaluateHeader(tag=tag, manifest=wire.manifest_to_proto(weights.manifest))
    )
    cached = weights.cached_chunks(chunk_bytes)
    if cached is not None:
        return wire.serialized_messages(head, cached, on_bytes)
    return wire.weight_messages(head, weights.payload, chunk_bytes, on_bytes=on_bytes)


@contextlib.contextmanager
def _border() -> Iterator[None]:
    """Every way a call ends other than its answer, as a Failure (coordinator.failures):
    a gRPC status by its kind, an answer that failed this client's checks as INVALID,
    anything else as INTERNAL. The round drivers see no gRPC error."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise Failure.of_rpc(error) from error
    except Exception as error:
        raise Failure.of_error(error, checked=True) from error


class _Connection:
    """A worker's channel and the calls made on it."""

    def __init__(self, address: str, credentials: Optional[grpc.ChannelCredentials]) -> None:
        self.channel = _channel(address, credentials)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        # Train as the stub's, but writing the global model's serialized chunks as they are.
        self.train = self.channel.stream_stream(
            TRAIN_METHOD, request_serializer=wire.pass_serialized,
            response_deserializer=worker_pb2.TrainResponse.FromString,
        )


class WorkerClient:
    def __init__(
        self, name: str, address: str, chunk_bytes: int, *,
        credentials: Optional[grpc.ChannelCredentials] = None, metadata: Metadata = (),
        telemetry: Optional[Telemetry] = None, run_id: str = "",
    ) -> None:
        """`run_id` names this run in every Train header, so a worker that another run
        is driving refuses it (FAILED_PRECONDITION, both runs named); "" says nothing.
        The model it trains is known once the fleet has answered: see `expect`."""
        self.name = name
        self.run_id = run_id
        self.address = address
        self._expected: Optional[Tuple[str, Tuple[TensorInfo, ...], int]] = None
        # --downlink-encoding, and the weights this worker holds after its last
        # successful Train: a round then sends the global model as a delta from them.
        self._downlink = compression.RAW_ENCODING
        self._holding: Optional[compression.Held] = None
        self._chunk_bytes = chunk_bytes
        self._telemetry = telemetry or Telemetry()
        self._metadata = metadata
        self._guarded = credentials is not None or bool(metadata)
        self._credentials = credentials
        self._connection: Optional[_Connection] = None
        self._calls = 0  # in flight: `release` closes only an idle connection

    @contextlib.contextmanager
    def _connected(self) -> Iterator[_Connection]:
        """The worker's connection, opened if `release` closed it, for one call (counted)."""
        if self._connection is None:
            self._connection = _Connection(self.address, self._credentials)
        self._calls += 1
        try:
            yield self._connection
        finally:
            self._calls -= 1

    async def release(self) -> None:
        """Close the connection if no call is using it; the next call opens another.
        After a model has crossed it, gRPC keeps about a chunk's worth of read buffers
        per open connection for as long as it stays open (~1 MiB at 1 MiB chunks:
        300 connections held 400 MB in a bare grpc.aio client); a fleet larger than
        --max-concurrency closes each worker's when its call ends (Federation.beyond_bound),
        so a fleet of any size costs the bound's connections, at one reconnect (a TCP, and
        a TLS, handshake) per worker per round."""
        connection = self._connection
        if connection is None or self._calls:
            return
        self._connection = None
        await connection.channel.close()

    def expect(self, model: str, spec: Tuple[TensorInfo, ...], max_payload_bytes: int,
               downlink: compression.Encoding = compression.RAW_ENCODING) -> None:
        """The run's model, once known: every Train result must be weights of `model`
        with exactly `spec`, no larger than `max_payload_bytes`. With a `downlink`
        encoding other than raw, the global model goes as a delta from the one this
        worker holds (its last successful Train's), full when there is none."""
        self._expected = (model, spec, max_payload_bytes)
        self._downlink = downlink

    def _downlink_of(self, weights: Weights) -> Downlink:
        return downlink_for(weights, self._holding, self._downlink, self._chunk_bytes)

    async def info(self, timeout: float, wait: bool = True) -> info_pb2.GetInfoResponse:
        """With `wait`, waits for the worker to come up, within `timeout`."""
        with _border(), self._connected() as connection:
            return await connection.stub.GetInfo(info_pb2.GetInfoRequest(), timeout=timeout, wait_for_ready=wait)

    async def initial_weights(self, seed: int, model: str, digest: str, max_bytes: int, timeout: float) -> Weights:
        """The worker's freshly built model for `seed`, proven to be `model` with the
        spec whose digest is `digest` (the fleet's, from GetInfo; "" from a worker too
        old to say) before its bytes are buffered, then whole and finite."""

        def check_header(header: worker_pb2.InitialWeightsHeader, manifest: Manifest) -> None:
            codec.check_manifest(manifest, model, manifest.tensors)
            announced = codec.spec_digest(manifest.tensors)
            if digest and announced != digest:
                raise ManifestMismatch(f"initial weights: worker {self.name} sent tensors with digest "
                                       f"{announced[:12]}, but it reports model digest {digest[:12]}")

        with _border(), self._connected() as connection:
            call = connection.stub.InitialWeights(worker_pb2.InitialWeightsRequest(seed=seed), timeout=timeout,
                                             metadata=self._metadata)
            _, manifest, payload = await wire.read_weight_stream(
                call, "header", max_bytes, check_head=check_header,
                on_bytes=self._telemetry.on_bytes_received("InitialWeights"),
            )
            state = codec.decode_finite(manifest, payload, payload.sha256, who=self.name)
        return Weights(manifest, payload, state)

    async def keep_initial(self, seed: int, weights: Weights, timeout: float) -> bool:
        """Ask the worker to build the initial model for `seed` itself and keep it as the
        base of its first Train's delta, answering with its manifest alone; True, and
        round 1 sends it a delta (empty) instead of the whole model, when that manifest
        is `weights`' own. False, holding nothing, from a worker whose build differs or
        one older than `keep` (which sends the whole model: the call is cancelled)."""
        with _border(), self._connected() as connection:
            call = connection.stub.InitialWeights(worker_pb2.InitialWeightsRequest(seed=seed, keep=True), timeout=timeout,
                                             metadata=self._metadata)
            try:
                first = await call.read()
            finally:
                call.cancel()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "header" or not first.header.kept:
            return False
        manifest = wire.manifest_from_proto(first.header.manifest)
        if manifest.sha256 != weights.manifest.sha256 or manifest.tensors != weights.manifest.tensors:
            log.info("worker=%s builds other initial weights for seed %d (sha256 %s, the run's %s): its round 1 "
                     "gets them whole", self.name, seed, manifest.sha256[:16], weights.manifest.sha256[:16])
            return False
        self._holding = weights.held()
        return True

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        """One round on this worker. A delta the worker cannot apply (it restarted, or
        missed a Train) is refused FAILED_PRECONDITION at its header, and the round is
        asked again at once with full weights."""
        sending = self._downlink_of(weights)
        self._holding = None  # until this Train succeeds: a failed one leaves the worker's unknown
        try:
            update = await self._train(round_number, config, weights, sending, timeout)
        except Failure as failure:
            if sending.manifest.content != compression.DELTA or "manifest.base_sha256" not in failure.detail:
                raise
            sending = Downlink(weights.manifest, weights.chunks(self._chunk_bytes), weights.held())
            update = await self._train(round_number, config, weights, sending, timeout)
        self._holding = sending.holding
        return update

    async def _train(self, round_number: int, config: TrainConfig, weights: Weights, sending: Downlink,
                     timeout: float) -> Update:
        if self._expected is None:
            raise RuntimeError(f"worker {self.name}: train before expect (the run's model is not known yet)")
        model, spec, max_payload_bytes = self._expected
        asked = compression.Encoding.parse(config.uplink_encoding)
        head = worker_pb2.TrainRequest(
            header=worker_pb2.TrainHeader(
                round=round_number, config=wire.config_to_proto(config),
                manifest=wire.manifest_to_proto(sending.manifest), run_id=self.run_id,
            )
        )

        def check_result(result: worker_pb2.TrainResult, manifest: Manifest) -> None:
            if result.round != round_number:
                raise BadStream(f"result.round: worker {self.name} answered for round {result.round}, not {round_number}")
            check_result_manifest(manifest, model, spec, asked, sending.holding.id, self.name)
            if config.private and not (math.isfinite(result.epsilon) and result.epsilon > 0
                                       and result.delta == config.dp_delta):
                raise BadStream(f"result.epsilon: worker {self.name} answered a DP-SGD round with epsilon "
                                f"{result.epsilon} at delta {result.delta}, not a positive epsilon at dp_delta "
                                f"{config.dp_delta:g}: it did not apply DP (a worker older than DP-SGD?); upgrade it")

        with _border(), self._connected() as connection:
            call = connection.train(timeout=timeout, metadata=self._metadata)
            messages = wire.serialized_messages(head, sending.chunks, self._telemetry.on_bytes_sent("Train"))
            await _send(call, messages, self._guarded)
            result, manifest, payload = await wire.read_weight_stream(
                call, "result", max_payload_bytes, check_head=check_result,
                on_bytes=self._telemetry.on_bytes_received("Train"),
            )
            received = codec.decode_finite(manifest, payload, payload.sha256, who=self.name)
            trained = rebuild(manifest, payload, received, sending.holding, weights, spec, model, self.name)
        return Update(
            worker=self.name, weights=trained, num_examples=result.num_examples,
            mean_loss=result.mean_loss, train_seconds=result.train_seconds, device=result.device,
            bytes_down=sending.manifest.total_bytes, bytes_up=manifest.total_bytes,
            raw_down=weights.manifest.total_bytes, raw_up=trained.manifest.total_bytes, epsilon=result.epsilon, delta=result.delta,
        )

    async def end_run(self, timeout: float) -> bool:
        """Tell the worker this run has ended, so it serves the next run at once; True if
        it was freed. Never waits for a worker that is down: the run is over."""
        with _border(), self._connected() as connection:
            reply = await connection.stub.EndRun(worker_pb2.EndRunRequest(run_id=self.run_id), timeout=timeout,
                                            wait_for_ready=False, metadata=self._metadata)
        return reply.released

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.channel.close()
            self._connection = None


class EvaluatorClient:
    def __init__(
        self, address: str, chunk_bytes: int,
        credentials: Optional[grpc.ChannelCredentials] = None, metadata: Metadata = (),
        telemetry: Optional[Telemetry] = None,
    ) -> None:
        self.address = address
        self._chunk_bytes = chunk_bytes
        self._telemetry = telemetry or Telemetry()
        self._metadata = metadata
        self._guarded = credentials is not None or bool(metadata)
        self._channel = _channel(address, credentials)
        self._stub = evaluator_pb2_grpc.EvaluatorStub(self._channel)
        # Evaluate as the stub's, but able to write a model's serialized chunks as they are.
        self._evaluate = self._channel.stream_unary(
            EVALUATE_METHOD, request_serializer=wire.pass_serialized,
            response_deserializer=evaluation_pb2.EvaluateResponse.FromString,
        )

    async def info(self, timeout: float) -> info_pb2.GetInfoResponse:
        with _border():
            return await self._stub.GetInfo(info_pb2.GetInfoRequest(), timeout=timeout, wait_for_ready=True)

    async def evaluate(self, tag: str, weights: Weights, timeout: float) -> Score:
        with _border():
            call = self._evaluate(timeout=timeout, metadata=self._metadata)
            messages = _evaluate_messages(tag, weights, self._chunk_bytes, self._telemetry.on_bytes_sent("Evaluate"))
            await _send(call, messages, self._guarded)
            return _score(await call)

    async def close(self) -> None:
        await self._channel.close()
