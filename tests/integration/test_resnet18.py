"""A model far past gRPC's 4 MiB message default: resnet18's ~45 MB of weights go to a
real worker, come back trained, and reach a real evaluator, in 1 MiB chunks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from coordinator.clients import EvaluatorClient, Weights, WorkerClient
from jetfed import codec, stream
from jetfed.config import TrainConfig
from jetfed.data import load_mnist, parse_labels
from jetfed.models import build_model
from tests.integration.services import evaluator_server, worker_server

MODEL = "resnet18"


def test_one_resnet18_round_through_worker_and_evaluator(tiny_mnist: Path) -> None:
    train_images = load_mnist(tiny_mnist, "train", download=False).subset(parse_labels("0-3"))
    test_images = load_mnist(tiny_mnist, "test", download=False)
    torch.manual_seed(0)
    initial = build_model(MODEL).state_dict()
    spec = codec.spec_of(initial)
    chunk = stream.DEFAULT_CHUNK_BYTES

    async def scenario() -> None:
        """Asserts inside: returning tensors from asyncio.run's coroutine costs seconds on
        Python 3.11, whose Runner reprs the finished main task when it restores SIGINT."""
        async with worker_server(train_images, model=MODEL) as (_, worker_address), \
                evaluator_server(test_images, model=MODEL) as evaluator_address:
            worker = WorkerClient("alice", worker_address, chunk)
            worker.expect(MODEL, spec, stream.DEFAULT_MAX_PAYLOAD_BYTES)
            evaluator = EvaluatorClient(evaluator_address, chunk)
            try:
                update = await worker.train(1, TrainConfig(batch_size=8, max_batches=1), Weights.of(initial, MODEL), 120)
                score = await evaluator.evaluate("global", update.weights, 120)
            finally:
                await worker.close()
                await evaluator.close()
        manifest = update.weights.manifest
        assert manifest.model == MODEL
        assert manifest.tensors == spec
        assert "net.layer4.1.bn2.running_var" in {t.name for t in manifest.tensors}
        assert manifest.total_bytes > 40_000_000 > 10 * chunk
        assert update.num_examples == 8
        assert not torch.equal(update.weights.state["net.fc.weight"], initial["net.fc.weight"])
        assert score.total == len(test_images) == 200
        assert 0 <= score.correct <= score.total

    asyncio.run(scenario())
