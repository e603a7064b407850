"""One worker must not own the global model. Real gRPC servers posing as workers join
the three honest worker processes: mallory answers with finite, well-formed,
checksummed garbage that claims 2^63-1 training examples, and is dropped; trudy trains
for real on every label and sends its change scaled up a hundredfold with an honest
example count, and is scaled back to a typical worker's say."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator, Dict, List

import pytest
import torch
from safetensors.torch import load_file

from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed import codec, serving, wire
from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.data import LabeledImages, load_mnist
from jetfed.info import service_info
from jetfed.models import build_model
from jetfed.training import DeviceData, train_round
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.processes import Fleet

ANNOUNCED = [10] * 10  # 100 examples, as GetInfo tells the coordinator
BOOST = 100.0


class PoisoningWorker(worker_pb2_grpc.WorkerServicer):
    """Speaks the protocol perfectly; `poison` makes the weights it answers with."""

    def __init__(self, name: str, poison: str, data: DeviceData) -> None:
        self.name = name
        self.poison = poison
        self.data = data

    async def GetInfo(self, request, context):
        return service_info(self.name, "worker", "cpu", task="mnist", model="mnist-cnn", classes=[str(d) for d in range(10)],
                            model_digest=codec.spec_digest(codec.spec_of(build_model("mnist-cnn").state_dict())),
                            label_counts=ANNOUNCED, dataset_size=sum(ANNOUNCED))

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
        trained = train_round(model, self.data, config, seed=1)
        boosted = {k: base[k] + BOOST * (v - base[k]) if v.is_floating_point() else v for k, v in trained.state.items()}
        return boosted, trained.num_examples


def federate(fleet: Fleet, out: Path, hostile: Dict[str, str], data: Path, max_norm_ratio: float = 10.0) -> List[dict]:
    """Three rounds with the honest fleet plus the `hostile` servers (name -> poison);
    they train on the first examples of `data`, every label."""
    images = load_mnist(data, "train", download=False)
    sample = DeviceData.from_images(LabeledImages(images.images[:sum(ANNOUNCED)], images.labels[:sum(ANNOUNCED)]),
                                    torch.device("cpu"))

    async def scenario() -> None:
        poisoners = [PoisoningWorker(name, poison, sample) for name, poison in hostile.items()]
        servers = [
            await serving.start_server([serving.Service(
                "jetfed.v1.Worker", lambda s, w=poisoner: worker_pb2_grpc.add_WorkerServicer_to_server(w, s),
            )], "127.0.0.1", 0)
            for poisoner in poisoners
        ]
        try:
            workers = {name: process.address for name, process in fleet.workers.items()}
            workers.update({name: f"127.0.0.1:{server.port}" for name, server in zip(hostile, servers)})
            settings = RunSettings(workers=workers, evaluator=fleet.evaluator.address, out_dir=out, rounds=3,
                                   min_workers=3, max_backoff=1.0, max_norm_ratio=max_norm_ratio,
                                   train=TrainConfig(max_batches=2, seed=3)).validated()
            await run(settings, say=lambda line: None)
        finally:
            for server in servers:
                await server.stop(0)

    asyncio.run(scenario())
    return metrics(out)


def metrics(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def accuracy(records: List[dict]) -> float:
    return records[-1]["evaluation"]["global"]["accuracy"]


@pytest.fixture(scope="module")
def honest(fleet: Fleet, tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run of the honest fleet alone, the yardstick of both tests."""
    out = tmp_path_factory.mktemp("honest")
    federate(fleet, out, {}, tiny_mnist)
    return out


def test_garbage_claiming_2_63_examples_is_dropped_and_the_model_is_the_honest_one(
    fleet: Fleet, tiny_mnist: Path, honest: Path, tmp_path: Path,
) -> None:
    attacked = federate(fleet, tmp_path, {"mallory": "garbage"}, tiny_mnist)
    assert all(r["workers"] == ["alice", "bob", "charlie"] for r in attacked)
    assert attacked[0]["failed"]["mallory"] == (
        "REJECTED: claims 9223372036854775807 training examples, the round allows 1..64 "
        "(2 batches x 32 x 1 epochs over the 100 examples its GetInfo announced)")
    assert all("mallory" in r["skipped"] or r["failed"]["mallory"].startswith("REJECTED: claims") for r in attacked)
    assert accuracy(attacked) == accuracy(metrics(honest)) > 0.5
    clean = load_file(str(honest / "model.safetensors"))
    survived = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(clean[k], survived[k]) for k in clean)


def test_a_hundredfold_change_gets_a_typical_workers_say(
    fleet: Fleet, tiny_mnist: Path, honest: Path, tmp_path: Path,
) -> None:
    """Without the rule (a ratio no change reaches) the same boost halves the accuracy."""
    unguarded = federate(fleet, tmp_path / "unguarded", {"trudy": "boost"}, tiny_mnist, max_norm_ratio=1e6)
    attacked = federate(fleet, tmp_path / "attacked", {"trudy": "boost"}, tiny_mnist)
    assert accuracy(unguarded) + 0.2 < accuracy(metrics(honest)) <= accuracy(attacked)
    for record in attacked:
        note = record["clipped"]["trudy"]
        assert note.startswith("delta norm ")
        assert note.endswith("(over 10x, --max-norm-ratio); scaled down to the median")
        assert float(note.split(" is ")[1].split("x")[0]) > 10, note
        assert record["workers"] == ["alice", "bob", "charlie", "trudy"] and record["failed"] == {}
