"""The global model's chunks are serialized once and written as they are to every call
that carries it: a worker's Train and the evaluator's Evaluate alike (the evaluator's
call once refused them: an asynchronous run scores a version its workers already got)."""

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

MODEL = "mnist-cnn"
CHUNK = 64 * 1024


def test_a_model_sent_to_a_worker_is_scored_from_the_same_serialized_chunks(tiny_mnist: Path) -> None:
    train_images = load_mnist(tiny_mnist, "train", download=False).subset(parse_labels("0-3"))
    test_images = load_mnist(tiny_mnist, "test", download=False)
    torch.manual_seed(0)
    initial = build_model(MODEL).state_dict()

    async def scenario():
        async with worker_server(train_images, model=MODEL) as (_, worker_address), \
                evaluator_server(test_images, model=MODEL) as evaluator_address:
            worker = WorkerClient("alice", worker_address, CHUNK)
            worker.expect(MODEL, codec.spec_of(initial), stream.DEFAULT_MAX_PAYLOAD_BYTES)
            evaluator = EvaluatorClient(evaluator_address, CHUNK)
            global_model = Weights.of(initial, MODEL)
            try:
                update = await worker.train(1, TrainConfig(batch_size=8, max_batches=1), global_model, 60)
                assert global_model.cached_chunks(CHUNK) is not None  # Train serialized them
                return update, await evaluator.evaluate("global", global_model, 60), \
                    await evaluator.evaluate("global", Weights.of(initial, MODEL), 60)
            finally:
                await worker.close()
                await evaluator.close()

    update, cached, fresh = asyncio.run(scenario())
    assert update.num_examples == 8
    assert cached == fresh and cached.total == len(test_images)
