"""One bad worker cannot poison the global model: a real gRPC server posing as a
worker answers every round with NaN weights, or with another model's tensors, next to
two honest worker processes; the coordinator drops and records it every time."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import AsyncIterator

import torch
from safetensors.torch import load_file

from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed import codec, serving, wire
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.v1 import worker_pb2, worker_pb2_grpc


class HostileWorker(worker_pb2_grpc.WorkerServicer):
    """Speaks the protocol perfectly and lies about the weights."""

    def __init__(self, poison: str) -> None:
        self.poison = poison

    async def GetInfo(self, request, context):
        from jetfed.info import service_info

        return service_info("mallory", "worker", "cpu", task="mnist", model="mnist-cnn", classes=[str(d) for d in range(10)],
                            model_digest=codec.spec_digest(codec.spec_of(build_model("mnist-cnn").state_dict())),
                            label_counts=[10] * 10, dataset_size=sum([10] * 10))

    async def Train(self, request_iterator, context) -> AsyncIterator[worker_pb2.TrainResponse]:
        head, manifest, payload = await wire.read_weight_stream(request_iterator, "header", 1 << 30)
        state = codec.decode(manifest, payload)
        if self.poison == "nan":
            state["fc2.bias"] = torch.full_like(state["fc2.bias"], math.nan)
        else:
            state["fc2.weight"] = torch.zeros(11, 500)
        manifest, blob = codec.encode(state, "mnist-cnn")
        result = worker_pb2.TrainResult(round=head.round, worker="mallory", num_examples=10**9,
                                        manifest=wire.manifest_to_proto(manifest))
        for message in wire.weight_messages(worker_pb2.TrainResponse(result=result), blob, 1 << 20,
                                            lambda c: worker_pb2.TrainResponse(chunk=c)):
            yield message


def run_with(fleet, tmp_path: Path, poison: str) -> list:
    async def scenario() -> None:
        servicer = HostileWorker(poison)
        hostile = await serving.start_server(
            [serving.Service("jetfed.v1.Worker", lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s))],
            "127.0.0.1", 0,
        )
        try:
            workers = {name: fleet.workers[name].address for name in ("alice", "bob")}
            workers["mallory"] = f"127.0.0.1:{hostile.port}"
            settings = RunSettings(workers=workers, evaluator=None, out_dir=tmp_path, rounds=3,
                                   train=TrainConfig(max_batches=2)).validated()
            await run(settings, say=lambda line: None)
        finally:
            await hostile.stop(0)

    asyncio.run(scenario())
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def dropped_or_skipped(records: list, code: str, detail: str) -> bool:
    """Every round mallory was asked, its update was dropped with the reason; in the
    others it was backing off. Round 1 always asks."""
    asked = [r for r in records if "mallory" not in r["skipped"]]
    return asked[0]["round"] == 1 and all(
        code in r["failed"]["mallory"] and detail in r["failed"]["mallory"] for r in asked
    ) and all("mallory" not in r["failed"] for r in records if r not in asked)


def test_nan_update_is_dropped_and_recorded(fleet, tmp_path):
    records = run_with(fleet, tmp_path, "nan")
    assert all(r["workers"] == ["alice", "bob"] for r in records)
    assert dropped_or_skipped(records, "INVALID_ARGUMENT", "NaN or Inf")
    final = load_file(str(tmp_path / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def test_update_for_another_model_is_dropped_and_recorded(fleet, tmp_path):
    records = run_with(fleet, tmp_path, "shape")
    assert all(r["workers"] == ["alice", "bob"] for r in records)
    assert dropped_or_skipped(records, "FAILED_PRECONDITION", "fc2.weight")
    final = load_file(str(tmp_path / "model.safetensors"))
    assert final["fc2.weight"].shape == build_model("mnist-cnn").fc2.weight.shape
