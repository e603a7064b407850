"""One worker must not own the global model. Two real gRPC servers posing as workers
join the three honest worker processes: mallory answers with finite, well-formed,
checksummed garbage that claims 2^63-1 training examples; trudy trains for real and
sends its change scaled up a hundredfold, with an honest example count. Both are
dropped and recorded every round they are asked, and the global model is the one the
honest fleet alone reaches, bit for bit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator, Dict, List

import torch
from safetensors.torch import load_file

from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed import codec, serving, wire
from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.info import service_info
from jetfed.models import build_model
from jetfed.training import DeviceData, train_round
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.processes import Fleet

ANNOUNCED = [10] * 10  # 100 examples, as GetInfo tells the coordinator
BOOST = 100.0


class PoisoningWorker(worker_pb2_grpc.WorkerServicer):
    """Speaks the protocol perfectly; `poison` makes the weights it answers with."""

    def __init__(self, name: str, poison: str) -> None:
        self.name = name
        self.poison = poison

    async def GetInfo(self, request, context):
        return service_info(self.name, "worker", "cpu", "mnist-cnn", ANNOUNCED)

    async def Train(self, request_iterator, context) -> AsyncIterator[worker_pb2.TrainResponse]:
        head, manifest, payload = await wire.read_weight_stream(request_iterator, "header", 1 << 30)
        config = wire.config_from_proto(head.config)
        state, claimed = self.answer(codec.decode(manifest, payload), config)
        manifest, blob = codec.encode(state, "mnist-cnn")
        result = worker_pb2.TrainResult(round=head.round, worker=self.name, num_examples=claimed,
                                        manifest=wire.manifest_to_proto(manifest))
        for message in wire.weight_messages(worker_pb2.TrainResponse(result=result), blob, 1 << 20,
                                            lambda c: worker_pb2.TrainResponse(chunk=c)):
            yield message

    def answer(self, base: StateDict, config: TrainConfig):
        if self.poison == "garbage":
            garbage = {k: torch.randn(v.shape).to(v.dtype) if v.is_floating_point() else v for k, v in base.items()}
            return garbage, 2**63 - 1
        model = build_model("mnist-cnn")
        model.load_state_dict(base)
        noise = DeviceData(torch.randn(sum(ANNOUNCED), 1, 28, 28), torch.randint(0, 10, (sum(ANNOUNCED),)))
        trained = train_round(model, noise, config, seed=1)
        boosted = {k: base[k] + BOOST * (v - base[k]) if v.is_floating_point() else v for k, v in trained.state.items()}
        return boosted, trained.num_examples


def federate(fleet: Fleet, out: Path, hostile: Dict[str, str]) -> List[dict]:
    """Three rounds with the honest fleet plus the `hostile` servers (name -> poison)."""
    async def scenario() -> None:
        servers = [
            await serving.start_server([serving.Service(
                "jetfed.v1.Worker",
                lambda s, w=PoisoningWorker(name, poison): worker_pb2_grpc.add_WorkerServicer_to_server(w, s),
            )], "127.0.0.1", 0)
            for name, poison in hostile.items()
        ]
        try:
            workers = {name: process.address for name, process in fleet.workers.items()}
            workers.update({name: f"127.0.0.1:{server.port}" for name, server in zip(hostile, servers)})
            settings = RunSettings(workers=workers, evaluator=fleet.evaluator.address, out_dir=out, rounds=3,
                                   min_workers=3, max_backoff=1.0,
                                   train=TrainConfig(max_batches=2, seed=3)).validated()
            await run(settings, say=lambda line: None)
        finally:
            for server in servers:
                await server.stop(0)

    asyncio.run(scenario())
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_poisoners_are_dropped_and_the_global_model_is_the_honest_one(fleet: Fleet, tmp_path: Path) -> None:
    honest = federate(fleet, tmp_path / "honest", {})
    attacked = federate(fleet, tmp_path / "attacked", {"mallory": "garbage", "trudy": "boost"})

    assert all(r["workers"] == ["alice", "bob", "charlie"] for r in attacked)
    first = attacked[0]["failed"]
    assert first["mallory"].startswith("REJECTED: claims 9223372036854775807 training examples, the round allows 1..64")
    assert first["trudy"].startswith("REJECTED: delta norm ") and "the median" in first["trudy"]
    ratio = float(first["trudy"].split(" is ")[1].split("x")[0])
    assert ratio > 10, first["trudy"]
    for record in attacked:
        for name in ("mallory", "trudy"):
            assert name in record["skipped"] or record["failed"][name].startswith("REJECTED: "), record

    accuracy = [r["evaluation"]["global"]["accuracy"] for r in (honest[-1], attacked[-1])]
    assert accuracy[0] == accuracy[1] > 0.5, accuracy
    clean = load_file(str(tmp_path / "honest" / "model.safetensors"))
    survived = load_file(str(tmp_path / "attacked" / "model.safetensors"))
    assert all(torch.equal(clean[k], survived[k]) for k in clean)
