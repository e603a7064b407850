"""Hypothesis throws random messages and raw byte streams at a real worker and evaluator:
every call ends with a status within its deadline, the services keep answering health,
and memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import threading
from pathlib import Path
from typing import Iterator, List, Tuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetfed.data import load_mnist
from jetfed.v1 import evaluation_pb2, training_pb2, weights_pb2, worker_pb2
from tests.integration.services import evaluator_server, worker_server

MAX_PAYLOAD = 1 << 20
CALL_TIMEOUT = 20.0
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def addresses(tiny_mnist: Path) -> Iterator[Tuple[str, str]]:
    """Both services on their own event loop thread, as in a real process."""
    images = load_mnist(tiny_mnist, "train", download=False)
    loop = asyncio.new_event_loop()
    ready: "asyncio.Future[Tuple[str, str]]" = loop.create_future()
    stop = asyncio.Event()

    async def host() -> None:
        async with contextlib.AsyncExitStack() as stack:
            _, worker = await stack.enter_async_context(worker_server(images, max_payload_bytes=MAX_PAYLOAD))
            evaluator = await stack.enter_async_context(evaluator_server(images))
            ready.set_result((worker, evaluator))
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(host(),), daemon=True)
    thread.start()
    yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 60), loop).result()
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


specs = st.builds(
    weights_pb2.TensorSpec, name=st.text(max_size=20), dtype=st.sampled_from(["F32", "I64", "F16", "XX", ""]),
    shape=st.lists(st.integers(0, 2**40), max_size=4),
)
manifests = st.builds(
    weights_pb2.WeightManifest, model=st.sampled_from(["mnist-cnn", "resnet18", "nope", ""]),
    format=st.sampled_from(["safetensors", "pickle", ""]), tensors=st.lists(specs, max_size=4),
    total_bytes=st.integers(0, 2**63), sha256=st.text(max_size=64),
)
configs = st.builds(
    training_pb2.TrainConfig, optimizer=st.integers(0, 5), loss=st.integers(0, 3),
    lr=st.floats(allow_nan=True, allow_infinity=True), momentum=st.floats(allow_nan=True),
    batch_size=st.integers(0, 2**32 - 1), max_batches=st.integers(0, 2**32 - 1),
    epochs=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**64 - 1),
)
chunks = st.builds(weights_pb2.WeightChunk, offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=4096))
train_messages = st.lists(
    st.one_of(
        st.builds(lambda h: worker_pb2.TrainRequest(header=h),
                  st.builds(worker_pb2.TrainHeader, round=st.integers(0, 2**32 - 1), config=configs, manifest=manifests)),
        st.builds(lambda c: worker_pb2.TrainRequest(chunk=c), chunks),
    ),
    max_size=6,
)
eval_messages = st.lists(
    st.one_of(
        st.builds(lambda m: evaluation_pb2.EvaluateRequest(header=evaluation_pb2.EvaluateHeader(manifest=m)), manifests),
        st.builds(lambda c: evaluation_pb2.EvaluateRequest(chunk=c), chunks),
    ),
    max_size=6,
)


def call(address: str, method: str, messages: List[bytes]) -> grpc.StatusCode:
    """Send serialized (or garbage) messages to `method`; the status it ends with."""
    with grpc.insecure_channel(address) as channel:
        rpc = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        try:
            for _ in rpc(iter(messages), timeout=CALL_TIMEOUT):
                pass
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung on {messages!r:.300}"
            return exc.code()
        return grpc.StatusCode.OK


def assert_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@FUZZ
@given(messages=train_messages)
def test_random_train_streams_are_refused_cleanly(addresses, messages):
    worker, _ = addresses
    code = call(worker, "/jetfed.v1.Worker/Train", [m.SerializeToString() for m in messages])
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), code
    assert_serving(worker)


@FUZZ
@given(messages=eval_messages)
def test_random_evaluate_streams_are_refused_cleanly(addresses, messages):
    _, evaluator = addresses
    code = call(evaluator, "/jetfed.v1.Evaluator/Evaluate", [m.SerializeToString() for m in messages])
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), code
    assert_serving(evaluator)


@FUZZ
@given(garbage=st.lists(st.binary(max_size=2048), max_size=4),
       method=st.sampled_from(["/jetfed.v1.Worker/Train", "/jetfed.v1.Worker/Evaluate", "/jetfed.v1.Evaluator/Evaluate"]))
def test_raw_bytes_are_refused_cleanly(addresses, garbage, method):
    address = addresses[1] if "Evaluator" in method else addresses[0]
    call(address, method, garbage)
    assert_serving(address)


def test_memory_stays_bounded_after_fuzzing(addresses):
    """Runs after the fuzzers in this module: nothing they sent may have been kept."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worker, _ = addresses
    for size in range(50):
        call(worker, "/jetfed.v1.Worker/Train", [worker_pb2.TrainRequest(
            header=worker_pb2.TrainHeader(manifest=weights_pb2.WeightManifest(total_bytes=MAX_PAYLOAD))
        ).SerializeToString()] + [worker_pb2.TrainRequest(chunk=weights_pb2.WeightChunk(
            offset=i * 65536, data=bytes(65536))).SerializeToString() for i in range(size % 16)])
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024, f"peak memory grew by {grown_kib} KiB"
