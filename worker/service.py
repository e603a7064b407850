"""The Worker servicer: logic only; transport lives in worker.cli."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import AsyncIterator, Optional

import grpc

from jetfed import codec, wire
from jetfed.config import TrainConfig
from jetfed.info import service_info
from jetfed.models import build_model
from jetfed.scoring import Scorer
from jetfed.status import rpc_status
from jetfed.telemetry import Telemetry
from jetfed.training import DeviceData, TrainOutcome, derive_seed, train_round
from jetfed.v1 import evaluation_pb2, info_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Trains one round at a time on data that never leaves the process.

    The model instance stays warm between rounds; each Train loads the incoming global
    weights into it, so every round starts from the coordinator's model, never from this
    worker's previous update.
    """

    def __init__(
        self, name: str, model_name: str, data: DeviceData, label_counts: list,
        device_label: str, executor: Executor, chunk_bytes: int, max_payload_bytes: int,
        receive_timeout: float = 120.0, telemetry: Optional[Telemetry] = None,
    ) -> None:
        self._name = name
        self._model_name = model_name
        self._model = build_model(model_name).to(data.labels.device)
        self._spec = codec.spec_of(self._model.state_dict())
        self._data = data
        self._label_counts = label_counts
        self._device_label = device_label
        self._executor = executor
        self._chunk_bytes = chunk_bytes
        self._max_payload_bytes = max_payload_bytes
        self._receive_timeout = receive_timeout
        self._training = asyncio.Lock()
        self._training_round = 0
        self._telemetry = telemetry or Telemetry()
        self._scorer = Scorer(model_name, data, device_label, executor, max_payload_bytes,
                              receive_timeout=receive_timeout, telemetry=self._telemetry)

    async def GetInfo(self, request: info_pb2.GetInfoRequest, context: grpc.aio.ServicerContext) -> info_pb2.GetInfoResponse:
        return service_info(self._name, "worker", self._device_label, self._model_name, self._label_counts)

    async def Train(
        self, request_iterator: AsyncIterator[worker_pb2.TrainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TrainResponse]:
        if self._training.locked():
            log.warning("rpc=Train peer=%s status=ABORTED busy with round %d", context.peer(), self._training_round)
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"worker {self._name} is already training round {self._training_round}; retry when it is done",
            )
        async with self._training, rpc_status(context, "Train"):
            head, manifest, payload = await wire.read_weight_stream(
                request_iterator, "header", self._max_payload_bytes, self._receive_timeout, self._check_header,
                self._telemetry.on_bytes_received("Train"),
            )
            config = wire.config_from_proto(head.config)
            state = codec.decode(manifest, payload)
            codec.require_finite(state)
            seed = derive_seed(config.seed, head.round, self._name)
            loop = asyncio.get_running_loop()
            outcome: TrainOutcome = await loop.run_in_executor(
                self._executor, self._train, state, config, seed
            )
            result_manifest, result_payload = codec.encode(outcome.state, self._model_name)
            log.info(
                "train round=%d examples=%d loss=%.4f seconds=%.3f",
                head.round, outcome.num_examples, outcome.mean_loss, outcome.seconds,
            )
            result = worker_pb2.TrainResult(
                round=head.round, worker=self._name, num_examples=outcome.num_examples,
                mean_loss=outcome.mean_loss, train_seconds=outcome.seconds,
                device=self._device_label, manifest=wire.manifest_to_proto(result_manifest),
            )
            for message in wire.weight_messages(
                worker_pb2.TrainResponse(result=result), result_payload, self._chunk_bytes,
                lambda chunk: worker_pb2.TrainResponse(chunk=chunk), self._telemetry.on_bytes_sent("Train"),
            ):
                yield message

    def _check_header(self, head: worker_pb2.TrainHeader, manifest: codec.Manifest) -> None:
        """Refuse a bad config or another model's weights before their bytes arrive."""
        self._training_round = head.round
        wire.config_from_proto(head.config)
        codec.check_manifest(manifest, self._model_name, self._spec)

    async def Evaluate(
        self, request_iterator: AsyncIterator[evaluation_pb2.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> evaluation_pb2.EvaluateResponse:
        async with rpc_status(context, "Evaluate"):
            return await self._scorer.score(request_iterator)

    def warm_up(self) -> None:
        """Pay torch's first-call costs (kernel selection, allocator growth) at start-up,
        not in round 1; the weights are overwritten by the first Train anyway."""
        train_round(self._model, self._data, TrainConfig(batch_size=32, max_batches=1), seed=0)
        self._scorer.warm_up()

    def _train(self, state: codec.StateDict, config: TrainConfig, seed: int) -> TrainOutcome:
        self._model.load_state_dict(state)
        return train_round(self._model, self._data, config, seed)
