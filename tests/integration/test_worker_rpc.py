"""The Worker service over a real gRPC channel: the happy paths, and every malformed
Train stream answered with its exact status while the server keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path
from typing import AsyncIterator, Callable, List, Optional

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load as load_safetensors

from jetfed import codec, wire
from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.data import LabeledImages, load_mnist, parse_labels
from jetfed.models import build_model
from jetfed.serving import CHANNEL_OPTIONS
from jetfed.v1 import evaluation_pb2, info_pb2, weights_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.services import worker_server

Code = grpc.StatusCode
SEND_CHUNK = 16 << 10
REPLY_CHUNK = 64 << 10
MAX_PAYLOAD = 2 << 20  # mnist-cnn's 1.7 MB fits, a padded copy does not
CONFIG = TrainConfig(lr=0.1, batch_size=16, max_batches=3, seed=7)


@pytest.fixture(scope="module")
def images(tiny_mnist: Path) -> LabeledImages:
    return load_mnist(tiny_mnist, "train", download=False).subset(parse_labels("0-3"))


def initial_state() -> StateDict:
    torch.manual_seed(0)
    return build_model("mnist-cnn").state_dict()


def requests(
    state: Optional[StateDict] = None, round_number: int = 1,
    edit: Callable[[worker_pb2.TrainHeader], object] = lambda header: None,
) -> List[worker_pb2.TrainRequest]:
    """A well-formed Train stream (header, then SEND_CHUNK slices), with `edit` applied to the header."""
    manifest, payload = codec.encode(initial_state() if state is None else state, "mnist-cnn")
    header = worker_pb2.TrainHeader(
        round=round_number, config=wire.config_to_proto(CONFIG), manifest=wire.manifest_to_proto(manifest)
    )
    edit(header)
    return list(wire.weight_messages(
        worker_pb2.TrainRequest(header=header), payload, SEND_CHUNK, lambda c: worker_pb2.TrainRequest(chunk=c)
    ))


def edited(**tensors: torch.Tensor) -> StateDict:
    return {**initial_state(), **tensors}


def renamed() -> StateDict:
    state = initial_state()
    state["fc3.weight"] = state.pop("fc2.weight")
    return state


def with_nan() -> StateDict:
    state = initial_state()
    state["fc1.bias"][3] = math.nan
    return state


def extra_chunk(messages: list) -> list:
    last = messages[-1].chunk
    chunk = weights_pb2.WeightChunk(offset=last.offset + len(last.data), data=b"\0" * 8)
    return [*messages, worker_pb2.TrainRequest(chunk=chunk)]


def set_field(path: str, value: object) -> Callable[[worker_pb2.TrainHeader], None]:
    message, name = path.split(".")
    return lambda header: setattr(getattr(header, message), name, value)


# (stream, code, words the details must hold). EARLY streams end at the fault and are
# then held open: the server must refuse them without waiting for the rest. (Writing
# after the server's status would also trip grpc/grpc#36066: the aio client then
# reports INTERNAL instead of the server's code.)
EARLY = [
    pytest.param(lambda: requests()[1:2], Code.INVALID_ARGUMENT, "first message must carry the header", id="chunk-first"),
    pytest.param(lambda: requests()[:2] + requests()[:1], Code.INVALID_ARGUMENT, "only chunks may follow",
                 id="second-header"),
    pytest.param(lambda: requests()[0:2] + requests()[3:4], Code.INVALID_ARGUMENT, "out of order", id="out-of-order"),
    pytest.param(lambda: extra_chunk(requests()), Code.DATA_LOSS, "more than the announced", id="overrun"),
    pytest.param(lambda: requests(edited(padding=torch.zeros(300_000)))[:1], Code.RESOURCE_EXHAUSTED,
                 f"limit of {MAX_PAYLOAD}", id="too-large"),
]
WHOLE = [
    pytest.param(lambda: [], Code.INVALID_ARGUMENT, "ended before the header", id="empty-stream"),
    pytest.param(lambda: requests()[:-1], Code.DATA_LOSS, "stream ended after", id="truncated"),
    pytest.param(lambda: requests(renamed()), Code.FAILED_PRECONDITION, "'fc2.weight'", id="tensor-names"),
    pytest.param(lambda: requests(edited(**{"fc2.weight": torch.zeros(9, 500)})), Code.FAILED_PRECONDITION,
                 "manifest.tensors['fc2.weight']", id="tensor-shape"),
    pytest.param(lambda: requests(edit=set_field("manifest.model", "resnet18")), Code.FAILED_PRECONDITION,
                 "manifest.model", id="other-model"),
    pytest.param(lambda: requests(edit=set_field("manifest.sha256", "0" * 64)), Code.DATA_LOSS, "sha256", id="sha256"),
    pytest.param(lambda: requests(with_nan()), Code.INVALID_ARGUMENT, "'fc1.bias' holds NaN", id="nan"),
    pytest.param(lambda: requests(edit=set_field("config.lr", 0.0)), Code.INVALID_ARGUMENT, "lr:", id="lr-zero"),
    pytest.param(lambda: requests(edit=set_field("config.batch_size", 0)), Code.INVALID_ARGUMENT, "batch_size:",
                 id="batch-size-zero"),
    pytest.param(lambda: requests(edit=set_field("config.optimizer", 99)), Code.INVALID_ARGUMENT, "optimizer:",
                 id="unknown-optimizer"),
]


async def train(stub: worker_pb2_grpc.WorkerStub, messages: object, timeout: float = 60) -> List[worker_pb2.TrainResponse]:
    return [response async for response in stub.Train(messages, timeout=timeout)]


async def refused_while_open(stub: worker_pb2_grpc.WorkerStub, messages: list) -> grpc.aio.AioRpcError:
    """Send `messages`, then neither write nor half-close until the server answers."""
    answered = asyncio.Event()

    async def held() -> AsyncIterator[worker_pb2.TrainRequest]:
        for message in messages:
            yield message
        await answered.wait()

    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await train(stub, held(), timeout=10)
        return refused.value
    finally:
        answered.set()


async def serving_status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def run_with_worker(images: LabeledImages, scenario: Callable, **options: object) -> None:
    """Serve a worker in-process and run `scenario(service, stub, channel)` against it."""
    async def main() -> None:
        async with worker_server(images, chunk_bytes=REPLY_CHUNK, **options) as (service, address):
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                await scenario(service, worker_pb2_grpc.WorkerStub(channel), channel)
    asyncio.run(main())


def test_get_info_describes_the_worker(images: LabeledImages) -> None:
    async def scenario(service, stub, channel) -> None:
        info = await stub.GetInfo(info_pb2.GetInfoRequest(), timeout=10)
        assert (info.name, info.role, info.model, info.device) == ("alice", "worker", "mnist-cnn", "cpu")
        assert list(info.label_counts) == [60, 60, 60, 60, 0, 0, 0, 0, 0, 0]
        assert info.dataset_size == 240
    run_with_worker(images, scenario)


def test_train_streams_back_updated_weights(images: LabeledImages) -> None:
    sent = initial_state()

    async def scenario(service, stub, channel) -> None:
        result, *chunks = await train(stub, requests(sent, round_number=3))
        assert result.WhichOneof("kind") == "result"
        assert all(c.WhichOneof("kind") == "chunk" for c in chunks)
        result = result.result
        assert (result.round, result.worker, result.device) == (3, "alice", "cpu")
        assert result.num_examples == CONFIG.batch_size * CONFIG.max_batches
        assert math.isfinite(result.mean_loss) and result.mean_loss > 0
        manifest = result.manifest
        assert len(chunks) == math.ceil(manifest.total_bytes / REPLY_CHUNK) > 1
        assert [c.chunk.offset for c in chunks] == list(range(0, manifest.total_bytes, REPLY_CHUNK))
        payload = b"".join(c.chunk.data for c in chunks)
        assert len(payload) == manifest.total_bytes
        assert hashlib.sha256(payload).hexdigest() == manifest.sha256
        got = load_safetensors(payload)
        assert {n: tuple(t.shape) for n, t in got.items()} == {n: tuple(t.shape) for n, t in sent.items()}
        assert sorted(t.name for t in manifest.tensors) == sorted(sent)
        assert any(not torch.equal(got[name], sent[name]) for name in sent)
    run_with_worker(images, scenario)


def test_evaluate_scores_the_workers_own_data(images: LabeledImages) -> None:
    async def scenario(service, stub, channel) -> None:
        manifest, payload = codec.encode(initial_state(), "mnist-cnn")
        head = evaluation_pb2.EvaluateRequest(
            header=evaluation_pb2.EvaluateHeader(tag="global", manifest=wire.manifest_to_proto(manifest), batch_size=64)
        )
        messages = wire.weight_messages(head, payload, SEND_CHUNK, lambda c: evaluation_pb2.EvaluateRequest(chunk=c))
        reply = await stub.Evaluate(messages, timeout=60)
        assert reply.total == 240 and 0 <= reply.correct <= 240
        assert reply.num_classes == 10 and len(reply.confusion) == 100
        assert sum(reply.predicted_counts) == 240 == sum(reply.confusion)
        assert sum(reply.confusion[label * 11] for label in range(10)) == reply.correct
        assert math.isfinite(reply.loss) and reply.loss > 0
        assert reply.device == "cpu"
    run_with_worker(images, scenario)


async def assert_refused_then_serving(channel, stub, refused: grpc.aio.AioRpcError, code, fragment: str) -> None:
    assert refused.code() == code, refused.details()
    assert fragment in refused.details()
    assert await serving_status(channel) == health_pb2.HealthCheckResponse.SERVING
    result, *_ = await train(stub, requests())
    assert result.result.num_examples > 0, "the worker must still train after refusing a stream"


@pytest.mark.parametrize("make, code, fragment", EARLY)
def test_bad_stream_is_refused_at_the_fault(images: LabeledImages, make: Callable, code: Code, fragment: str) -> None:
    async def scenario(service, stub, channel) -> None:
        refused = await refused_while_open(stub, make())
        await assert_refused_then_serving(channel, stub, refused, code, fragment)
    run_with_worker(images, scenario, max_payload_bytes=MAX_PAYLOAD)


@pytest.mark.parametrize("make, code, fragment", WHOLE)
def test_bad_stream_is_refused_at_its_end(images: LabeledImages, make: Callable, code: Code, fragment: str) -> None:
    async def scenario(service, stub, channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await train(stub, make())
        await assert_refused_then_serving(channel, stub, refused.value, code, fragment)
    run_with_worker(images, scenario, max_payload_bytes=MAX_PAYLOAD)


async def held_open(queue: asyncio.Queue) -> AsyncIterator[worker_pb2.TrainRequest]:
    while True:
        message = await queue.get()
        if message is None:
            return
        yield message


async def train_while_busy(service, stub) -> tuple:
    """Start round 7 and hold its stream open before the last chunk, then ask for
    round 8 (a whole stream: a refused header's caller is read to its end, so a client
    still writing hears the refusal's code); returns the second call's error and the
    first call's responses."""
    first = requests(round_number=7)
    queue: asyncio.Queue = asyncio.Queue()
    for message in first[:-1]:
        queue.put_nowait(message)
    call = asyncio.ensure_future(train(stub, held_open(queue)))
    # Only the service knows when round 7's handler holds the training lock.
    for _ in range(500):
        if service._training.locked():
            break
        await asyncio.sleep(0.01)
    assert service._training.locked(), "the first Train never started"
    with pytest.raises(grpc.aio.AioRpcError) as second:
        await train(stub, requests(round_number=8), timeout=10)
    refused = second.value
    queue.put_nowait(first[-1])
    queue.put_nowait(None)
    return refused, await call


def test_second_concurrent_train_is_aborted(images: LabeledImages) -> None:
    async def scenario(service, stub, channel) -> None:
        refused, responses = await train_while_busy(service, stub)
        assert refused.code() == Code.ABORTED
        assert "worker alice is already training" in refused.details()
        assert responses[0].result.round == 7
        assert await serving_status(channel) == health_pb2.HealthCheckResponse.SERVING
    run_with_worker(images, scenario)


def test_aborted_message_names_the_round_in_flight(images: LabeledImages) -> None:
    async def scenario(service, stub, channel) -> None:
        refused, _ = await train_while_busy(service, stub)
        assert "already training round 7" in refused.details()
    run_with_worker(images, scenario)
