"""The worker client's secure-aggregation calls (secagg.proto): setup, the masked Train,
unmask. A WorkerClient whose `train` asks for the masked update while a secure round
is armed (`arm`), so the round loop's bookkeeping (GetInfo first, telemetry, failures)
is the plain round's. Protobuf stops here: the round driver (coordinator.secure_rounds)
sees jetfed.secagg's messages and every failed call as a Failure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from coordinator.clients import Update, Weights, WorkerClient, _border, _send
from jetfed import codec, wire
from jetfed.codec import Manifest, TensorInfo
from jetfed.config import TrainConfig
from jetfed.errors import BadStream
from jetfed.secagg import FixedPoint, proto
from jetfed.secagg.messages import KeyAdvertisement, KeyShares, MaskedInput, Roster, UnmaskRequest, UnmaskResponse
from jetfed.v1 import secagg_pb2, worker_pb2, worker_pb2_grpc

# A parsed setup or unmask reply: each names the worker that sent it.
_Answer = TypeVar("_Answer", KeyAdvertisement, KeyShares, UnmaskResponse)

# The weights of a masked update: none reach the coordinator.
MASKED = Weights(codec.Manifest("", (), 0, ""), b"", {})


@dataclass(frozen=True)
class MaskedUpdate(Update):
    """A secure round's answer: the worker's figures (examples, loss, seconds) and its
    masked input; `weights` is empty."""

    masked: Optional[MaskedInput] = None


class SecureWorkerClient(WorkerClient):
    """A WorkerClient that also speaks secure aggregation."""

    _round: Optional[secagg_pb2.SecAggRoundStart] = None

    def arm(self, start: Optional[secagg_pb2.SecAggRoundStart]) -> None:
        """The next Train is this secure round's (None: disarmed)."""
        self._round = start

    async def advertise(self, fixed_point: FixedPoint, *, rekey: bool, min_epoch: int,
                        timeout: float) -> KeyAdvertisement:
        request = secagg_pb2.SecAggAdvertiseRequest(run_id=self.run_id, encoding=proto.encoding_to_proto(fixed_point),
                                                    rekey=rekey, min_epoch=min_epoch)
        return await self._ask(lambda stub: stub.SecAggAdvertise, request, proto.advertisement_from_proto,
                               "advertised keys", timeout)

    async def share_keys(self, roster: Roster, timeout: float) -> KeyShares:
        request = secagg_pb2.SecAggShareKeysRequest(roster=proto.roster_to_proto(roster))
        return await self._ask(lambda stub: stub.SecAggShareKeys, request, proto.key_shares_from_proto, "shared keys",
                               timeout)

    async def unmask(self, request: UnmaskRequest, timeout: float) -> UnmaskResponse:
        return await self._ask(lambda stub: stub.SecAggUnmask, proto.unmask_request_to_proto(self.run_id, request),
                               proto.unmask_response_from_proto, "answered the unmask", timeout)

    async def _ask(self, method: Callable[[worker_pb2_grpc.WorkerStub], Any], request: Any, parse: Callable[[Any], _Answer],
                   did: str, timeout: float) -> _Answer:
        """One secure-aggregation call (`method` picks it from the connection's stub):
        its failures typed at the border, its reply parsed, refused (BadStream) when it
        speaks for another worker than this one."""
        with _border(), self._connected() as connection:
            reply = await method(connection.stub)(request, timeout=timeout, metadata=self._metadata, wait_for_ready=False)
            answer = parse(reply)
            if answer.worker != self.name:
                raise BadStream(f"worker {self.name} {did} as {answer.worker!r}")
        return answer

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        if self._round is None:
            return await super().train(round_number, config, weights, timeout)
        sending = self._downlink_of(weights)
        self._holding = None
        update = await self._train_masked(round_number, config, weights, sending, self._round, timeout)
        self._holding = sending.holding
        return update

    async def _train_masked(self, round_number: int, config: TrainConfig, weights: Weights, sending,
                            start: secagg_pb2.SecAggRoundStart, timeout: float) -> MaskedUpdate:
        if self._expected is None:
            raise RuntimeError(f"worker {self.name}: train before expect (the run's model is not known yet)")
        model = self._expected[0]
        spec = (TensorInfo(proto.MASKED_TENSOR, "I32", (int(start.length),)),)
        head = worker_pb2.TrainRequest(header=worker_pb2.TrainHeader(
            round=round_number, config=wire.config_to_proto(config),
            manifest=wire.manifest_to_proto(sending.manifest), run_id=self.run_id, secagg=start))

        def check_result(result: worker_pb2.TrainResult, manifest: Manifest) -> None:
            if result.round != round_number:
                raise BadStream(f"result.round: worker {self.name} answered for round {result.round}, not {round_number}")
            if not result.HasField("secagg"):
                raise BadStream(f"result.secagg: worker {self.name} answered a secure-aggregation round without a "
                                "masked input (a worker older than secure aggregation?); its answer is dropped unread; "
                                "upgrade it")
            codec.check_manifest(manifest, model, spec)
            if config.private and not (math.isfinite(result.epsilon) and result.epsilon > 0
                                       and result.delta == config.dp_delta):
                raise BadStream(f"result.epsilon: worker {self.name} answered a DP-SGD round without a positive "
                                f"epsilon at dp_delta {config.dp_delta:g}: it did not apply DP")

        with _border(), self._connected() as connection:
            call = connection.train(timeout=timeout, metadata=self._metadata)
            messages = wire.serialized_messages(head, sending.chunks, self._telemetry.on_bytes_sent("Train"))
            await _send(call, messages, self._guarded)
            result, manifest, payload = await wire.read_weight_stream(
                call, "result", manifest_bytes(spec), check_head=check_result,
                on_bytes=self._telemetry.on_bytes_received("Train"))
            (tensor,) = codec.decode(manifest, payload, payload.sha256).values()
            vector = tensor.numpy().view("uint32").copy()
            masked = proto.masked_input_from_proto(self.name, result.secagg, vector)
        return MaskedUpdate(
            worker=self.name, weights=MASKED, num_examples=result.num_examples, mean_loss=result.mean_loss,
            train_seconds=result.train_seconds, device=result.device, bytes_down=sending.manifest.total_bytes,
            bytes_up=manifest.total_bytes, raw_down=weights.manifest.total_bytes, raw_up=manifest.total_bytes,
            epsilon=result.epsilon, delta=result.delta, masked=masked)


def manifest_bytes(spec) -> int:
    """The masked payload's exact size bound (safetensors header and data)."""
    return codec.payload_size_range(spec)[1]
