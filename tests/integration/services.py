"""Worker and evaluator services built the way their CLIs build them, served in-process
on port 0, for tests that need to reach inside (a small payload limit, a service's
lock) or to avoid a process start-up."""

from __future__ import annotations

import contextlib
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Tuple

import torch

from evaluator.service import EvaluatorService
from jetfed import serving, stream
from jetfed.data import LabeledImages
from jetfed.scoring import Scorer
from jetfed.tasks import TaskSettings
from jetfed.tasks.mnist import MnistTask
from jetfed.training import DeviceData
from jetfed.v1 import evaluator_pb2, evaluator_pb2_grpc, worker_pb2, worker_pb2_grpc
from worker.service import WorkerService

HOST = "127.0.0.1"
CPU = torch.device("cpu")


def mnist_task(model: str = "mnist-cnn") -> MnistTask:
    """The mnist task on the CPU; its examples come from the test, not from disk."""
    return MnistTask(TaskSettings(data_dir=Path("."), device=CPU, model=model))


@contextlib.asynccontextmanager
async def worker_server(
    images: LabeledImages, name: str = "alice", model: str = "mnist-cnn",
    chunk_bytes: int = stream.DEFAULT_CHUNK_BYTES, max_payload_bytes: int = stream.DEFAULT_MAX_PAYLOAD_BYTES,
) -> AsyncIterator[Tuple[WorkerService, str]]:
    """Yields the service and its address; call inside a running event loop."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    service = WorkerService(
        name, mnist_task(model), DeviceData.from_images(images, CPU), device_label="cpu", executor=executor,
        chunk_bytes=chunk_bytes, max_payload_bytes=max_payload_bytes,
    )
    full_name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    running = await serving.start_server(
        [serving.Service(full_name, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server))],
        HOST, 0,
    )
    try:
        yield service, f"{HOST}:{running.port}"
    finally:
        await running.stop(0)
        executor.shutdown()


@contextlib.asynccontextmanager
async def evaluator_server(images: LabeledImages, model: str = "mnist-cnn") -> AsyncIterator[str]:
    """Yields the evaluator's address; call inside a running event loop."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    scorer = Scorer(mnist_task(model), DeviceData.from_images(images, CPU), "cpu", executor,
                    stream.DEFAULT_MAX_PAYLOAD_BYTES)
    service = EvaluatorService("testing", scorer)
    full_name = evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"].full_name
    running = await serving.start_server(
        [serving.Service(full_name, lambda server: evaluator_pb2_grpc.add_EvaluatorServicer_to_server(service, server))],
        HOST, 0,
    )
    try:
        yield f"{HOST}:{running.port}"
    finally:
        await running.stop(0)
        executor.shutdown()
