"""A task that does not classify, through real gRPC: a worker and an evaluator serving
"digit value" (the mnist model read as a regression of the digit's value, scored by its
mean absolute error) and the coordinator's run. Its metrics reach the console (one line
per model, no share lines), metrics.jsonl, the Prometheus gauge and `jetfed report`."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from coordinator.plots import main as report_main
from coordinator.runner import run
from coordinator.settings import RunSettings
from evaluator.service import EvaluatorService
from jetfed import serving, stream
from jetfed.config import TrainConfig
from jetfed.data import load_mnist
from jetfed.scoring import Scorer
from jetfed.tasks import TaskSettings
from jetfed.tasks.base import Evaluation, Examples
from jetfed.tasks.mnist import MnistTask
from jetfed.telemetry import RunTelemetry
from jetfed.training import DeviceData
from jetfed.v1 import evaluator_pb2, evaluator_pb2_grpc, worker_pb2, worker_pb2_grpc
from worker.service import WorkerService

CPU = torch.device("cpu")
ROUNDS = 3
METRICS_LINE = re.compile(r"^(Model update alice|Federated model): loss \S+, mae \S+$")


class DigitValue(MnistTask):
    """MNIST read as a regression: the model's expected digit against the true one."""

    name = "digit-value"

    @property
    def classes(self) -> List[str]:
        return []

    def evaluate(self, model: nn.Module, data: Examples, batch_size: int, limit: Optional[int] = None) -> Evaluation:
        started = time.perf_counter()
        total = len(data) if limit is None else min(limit, len(data))
        digits = torch.arange(10, dtype=torch.float32)
        nll = error = 0.0
        model.eval()
        with torch.no_grad():
            for inputs, labels in data.batches(torch.arange(s, min(s + batch_size, total))
                                               for s in range(0, total, batch_size)):
                output = model(inputs)
                nll += float(F.nll_loss(output, labels, reduction="sum"))
                error += float((output.exp() @ digits - labels.float()).abs().sum())
        loss = nll / max(total, 1)
        return Evaluation(loss=loss, metrics={"loss": loss, "mae": error / max(total, 1)},
                          seconds=time.perf_counter() - started)


async def digit_value_run(tiny_mnist: Path, out: Path, telemetry: RunTelemetry) -> List[str]:
    task = DigitValue(TaskSettings(data_dir=tiny_mnist, device=CPU))
    train = DeviceData.from_images(load_mnist(tiny_mnist, "train", download=False), CPU)
    test = DeviceData.from_images(load_mnist(tiny_mnist, "test", download=False), CPU)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    limits = dict(max_payload_bytes=stream.DEFAULT_MAX_PAYLOAD_BYTES)
    worker = WorkerService("alice", task, train, device_label="cpu", executor=executor,
                           chunk_bytes=stream.DEFAULT_CHUNK_BYTES, **limits)
    evaluator = EvaluatorService("testing", Scorer(task, test, "cpu", executor, **limits))
    servers = [
        await serving.start_server([serving.Service(
            worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
            lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(worker, server))], "127.0.0.1", 0),
        await serving.start_server([serving.Service(
            evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"].full_name,
            lambda server: evaluator_pb2_grpc.add_EvaluatorServicer_to_server(evaluator, server))], "127.0.0.1", 0),
    ]
    lines: List[str] = []
    try:
        settings = RunSettings(
            task=DigitValue.name, workers={"alice": f"127.0.0.1:{servers[0].port}"},
            evaluator=f"127.0.0.1:{servers[1].port}",
            out_dir=out, rounds=ROUNDS, eval_every=1, train=TrainConfig(batch_size=32, max_batches=10, seed=1),
            connect_timeout=10.0,
        ).validated()
        await run(settings, say=lines.append, telemetry=telemetry)
    finally:
        for server in servers:
            await server.stop(0)
        executor.shutdown()
    return lines


def test_a_task_that_does_not_classify_shows_its_own_metrics(tiny_mnist: Path, tmp_path: Path) -> None:
    telemetry = RunTelemetry()
    lines = asyncio.run(digit_value_run(tiny_mnist, tmp_path, telemetry))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    scored = [line for line in lines if line.startswith(("Model update", "Federated model"))]
    assert len(scored) == 2 * ROUNDS and all(METRICS_LINE.match(line) for line in scored), scored
    assert not [line for line in lines if "Percentage numbers" in line or "Average loss" in line]
    for record in records:
        for model, who in (("global", "Federated model"), ("alice", "Model update alice")):
            score = record["evaluation"][model]
            assert (score["correct"], score["total"], score["predicted_counts"]) == (0, 0, [])
            assert set(score["metrics"]) == {"loss", "mae"} and score["metrics"]["loss"] == score["loss"]
            assert f"{who}: loss {score['loss']:.4g}, mae {score['metrics']['mae']:.4g}" in lines
    mae = [record["evaluation"]["global"]["metrics"]["mae"] for record in records]
    assert 0 < mae[-1] < mae[0] < 9, f"the federated model's error falls as it learns: {mae}"

    gauge = telemetry.registry.get_sample_value
    assert gauge("jetfed_evaluation_metric", {"model": "global", "metric": "mae"}) == mae[-1]
    assert gauge("jetfed_evaluation_metric", {"model": "global", "metric": "accuracy"}) is None
    assert gauge("jetfed_evaluated_round") == ROUNDS

    if importlib.util.find_spec("matplotlib") is not None:
        assert report_main([str(tmp_path)]) == 0
        assert sorted(p.name for p in tmp_path.glob("*.png")) == ["loss.png", "metrics.png", "rounds.png"]
