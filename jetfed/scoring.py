"""The Evaluate RPC's behaviour, shared by the worker (its own data) and the evaluator
(the test set): receive weights, prove them, score them off the event loop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Optional, Tuple

from jetfed import codec, wire
from jetfed.errors import InvalidConfig
from jetfed.info import service_info
from jetfed.status import echo
from jetfed.tasks.base import Evaluation, Examples, Task
from jetfed.telemetry import Telemetry
from jetfed.v1 import evaluation_pb2, info_pb2

log = logging.getLogger(__name__)

MAX_EVAL_BATCH = 65536


class Scorer:
    """Owns one model instance on the device; evaluations queue on its lock because a
    model can hold only one set of weights at a time."""

    def __init__(
        self, task: Task, data: Examples, device_label: str, executor: Executor,
        max_payload_bytes: int, batch_size: int = 500, receive_timeout: float = 120.0,
        telemetry: Optional[Telemetry] = None,
    ) -> None:
        self.task = task
        self.model_name = task.model_name
        self._model = task.build_model().to(data.device)
        self.spec = codec.spec_of(self._model.state_dict())
        self._data = data
        self._device_label = device_label
        self._executor = executor
        self._max_payload_bytes = max_payload_bytes
        self._batch_size = batch_size
        self._receive_timeout = receive_timeout
        self._lock = asyncio.Lock()
        self._telemetry = telemetry or Telemetry()

    async def score(self, requests: AsyncIterator[Any]) -> evaluation_pb2.EvaluateResponse:
        head, manifest, payload = await wire.read_weight_stream(
            requests, "header", self._max_payload_bytes, self._receive_timeout, self._check_header,
            self._telemetry.on_bytes_received("Evaluate"),
        )
        state = codec.decode_finite(manifest, payload, payload.sha256)
        batch_size = head.batch_size or self._batch_size
        if batch_size > MAX_EVAL_BATCH:
            raise InvalidConfig(f"batch_size: {batch_size} exceeds {MAX_EVAL_BATCH}")
        async with self._lock:
            loop = asyncio.get_running_loop()
            result: Evaluation = await loop.run_in_executor(self._executor, self._run, state, batch_size)
        log.info(
            "evaluate tag=%s correct=%d/%d loss=%.4f seconds=%.2f",
            echo(head.tag) or "-", result.correct, result.total, result.loss, result.seconds,
        )
        return evaluation_pb2.EvaluateResponse(
            correct=result.correct, total=result.total, loss=result.loss,
            predicted_counts=result.predicted_counts, confusion=result.confusion,
            num_classes=result.num_classes, seconds=result.seconds, device=self._device_label,
            metrics=result.metrics,
        )

    def info(self, name: str, role: str) -> info_pb2.GetInfoResponse:
        """GetInfo for a service scoring this task on these examples."""
        return task_info(name, role, self._device_label, self.task, self.spec, self._data)

    def _check_header(self, head: evaluation_pb2.EvaluateHeader, manifest: codec.Manifest) -> None:
        codec.check_manifest(manifest, self.model_name, self.spec)

    def warm_up(self) -> None:
        self.task.evaluate(self._model, self._data, self._batch_size, limit=self._batch_size)

    def _run(self, state: codec.StateDict, batch_size: int) -> Evaluation:
        self._model.load_state_dict(state)
        return self.task.evaluate(self._model, self._data, batch_size)


def task_info(
    name: str, role: str, device_label: str, task: Task, spec: Tuple[codec.TensorInfo, ...], data: Examples,
) -> info_pb2.GetInfoResponse:
    """GetInfo for a service running `task`'s model (`spec`) on `data`: what a fleet is
    matched by at connect (task, model, digest, classes) and what bounds a worker's
    claims (its examples)."""
    classes = task.classes
    return service_info(
        name, role, device_label, task=task.name, model=task.model_name, classes=classes,
        model_digest=codec.spec_digest(spec), dataset_size=len(data),
        label_counts=data.label_counts(len(classes)) if classes else [],
    )
