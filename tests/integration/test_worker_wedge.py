"""A worker is never wedged: real `jetfed worker` processes and real gRPC clients.

Abandoned training stops at the next batch (cancel, deadline, SIGTERM), the work one
Train may ask for is bounded, an idle stream holds nothing, a busy worker's ABORTED
reaches the real coordinator client as ABORTED, an overflowing field is refused rather
than wrapped, and a Train from a second run is refused while the first is going."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, List, Optional

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.clients import Metadata, Weights, WorkerClient
from coordinator.failures import Failure, Kind
from jetfed import codec, wire
from jetfed.auth import bearer_metadata
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.serving import CHANNEL_OPTIONS
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import make_tiny_mnist
from tests.integration.processes import START_TIMEOUT_S, Process, start, stop, wait_serving

Code = grpc.StatusCode
EXAMPLES = 3000  # the worker's partition: every label of a 3000-image training set
LIMIT = 500_000  # the worker's --max-examples-per-round
GRACE = 1.0
TOKEN = "wedge-test-token-0123456789"
# What a stop may take past --grace: the round's last batch, flushing logs, os._exit;
# milliseconds on a quiet machine, generous for a loaded CI runner.
STOP_MARGIN_S = 1.5
SMALL = TrainConfig(batch_size=16, max_batches=2)
# Valid and within LIMIT, yet hours of work: 100 epochs of batch size 1 over the
# whole partition (max_batches 0), about 6 ms a batch on one core.
ENORMOUS = TrainConfig(batch_size=1, max_batches=0, epochs=100)
# Batches of the whole partition, seconds each on one core: a round cancelled early in
# its first batch stays visible while it stops.
SLOW_BATCHES = TrainConfig(batch_size=EXAMPLES, max_batches=0, epochs=100)
STOPPED = re.compile(r"stopped ([0-9.]+)s after it was abandoned")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("wedge-mnist"), train=EXAMPLES, test=10)


def start_worker(data_dir: Path, logs: Path, name: str, *extra: str) -> Process:
    process = start(name, [
        "worker", "--name", name, "--labels", "all", "--data-dir", str(data_dir), "--no-download",
        "--threads", "1", "--grace", str(GRACE), "--max-examples-per-round", str(LIMIT), *extra,
    ], logs)
    wait_serving(process, time.monotonic() + START_TIMEOUT_S)
    return process


@pytest.fixture(scope="module")
def worker(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start_worker(data_dir, tmp_path_factory.mktemp("wedge-logs"), "alice")
    try:
        yield process
    finally:
        codes = stop([process])
    assert codes[process.name] == 0, process.output()


def initial_weights() -> Weights:
    torch.manual_seed(0)
    return Weights.of(build_model("mnist-cnn").state_dict(), "mnist-cnn")


def train_messages(config: TrainConfig, round_number: int = 1, run_id: str = "") -> List[worker_pb2.TrainRequest]:
    weights = initial_weights()
    header = worker_pb2.TrainHeader(
        round=round_number, config=wire.config_to_proto(config), manifest=wire.manifest_to_proto(weights.manifest),
        run_id=run_id,
    )
    return list(wire.weight_messages(
        worker_pb2.TrainRequest(header=header), weights.payload, 64 << 10, lambda c: worker_pb2.TrainRequest(chunk=c),
    ))


def client(process: Process, run_id: str = "", metadata: Metadata = ()) -> WorkerClient:
    spec = codec.spec_of(build_model("mnist-cnn").state_dict())
    worker = WorkerClient(process.name, process.address, 64 << 10, metadata=metadata, run_id=run_id)
    worker.expect("mnist-cnn", spec, 8 << 20)
    return worker


async def serving_status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def start_training(
    stub: worker_pb2_grpc.WorkerStub, config: TrainConfig, timeout: Optional[float] = None, settle: float = 1.5,
    metadata: Metadata = (),
):
    """A Train call whose whole stream has been sent, then `settle` seconds to train."""
    sent = asyncio.Event()

    async def stream() -> AsyncIterator[worker_pb2.TrainRequest]:
        for message in train_messages(config):
            yield message
        sent.set()

    call = stub.Train(stream(), timeout=timeout, metadata=metadata)
    await asyncio.wait_for(sent.wait(), 30)
    await asyncio.sleep(settle)
    assert not call.done(), f"the call ended early: {await call.code()} {await call.details()}"
    return call


async def seconds_until_trained(process: Process, limit: float, metadata: Metadata = ()) -> float:
    """Retry a small round until the worker takes it; how long that took."""
    started = time.monotonic()
    worker = client(process, metadata=metadata)
    try:
        while time.monotonic() - started < limit:
            try:
                await worker.train(1, SMALL, initial_weights(), timeout=limit)
                return time.monotonic() - started
            except Failure as exc:
                assert exc.status == "ABORTED", exc
                await asyncio.sleep(0.05)
    finally:
        await worker.close()
    pytest.fail(f"the worker took no new round within {limit:.0f}s:\n{process.output()[-3000:]}")


def last_stop_seconds(process: Process) -> float:
    found = STOPPED.findall(process.output())
    assert found, f"the worker never logged the abandoned round's stop:\n{process.output()[-3000:]}"
    return float(found[-1])


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_cancelled_train_stops_at_the_next_batch(worker: Process) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(worker.address, options=CHANNEL_OPTIONS) as channel:
            call = await start_training(worker_pb2_grpc.WorkerStub(channel), ENORMOUS)
            call.cancel()
            waited = await seconds_until_trained(worker, 10)
        print(f"cancel -> next round trained: {waited:.3f}s; cancel -> loop stopped: {last_stop_seconds(worker):.3f}s")
        assert last_stop_seconds(worker) < 1.0
    run(scenario)


def test_a_passed_deadline_stops_training(worker: Process) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(worker.address, options=CHANNEL_OPTIONS) as channel:
            call = await start_training(worker_pb2_grpc.WorkerStub(channel), ENORMOUS, timeout=2.5)
            assert await call.code() == Code.DEADLINE_EXCEEDED
            await seconds_until_trained(worker, 10)
        assert last_stop_seconds(worker) < 1.0
    run(scenario)


def test_health_is_not_serving_while_an_abandoned_round_stops(worker: Process) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(worker.address, options=CHANNEL_OPTIONS) as channel:
            call = await start_training(worker_pb2_grpc.WorkerStub(channel), SLOW_BATCHES, settle=0.3)
            call.cancel()
            await asyncio.sleep(0.1)
            assert await serving_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            refused = client(worker)
            try:
                with pytest.raises(Failure) as busy:
                    await refused.train(2, SMALL, initial_weights(), timeout=10)
            finally:
                await refused.close()
            assert busy.value.status == "ABORTED" and "stopping round 1" in busy.value.detail
            assert busy.value.kind is Kind.REFUSED
            await seconds_until_trained(worker, 10)
            assert await serving_status(channel) == health_pb2.HealthCheckResponse.SERVING
    run(scenario)


def test_work_over_the_per_round_bound_is_refused(worker: Process) -> None:
    async def scenario() -> None:
        worker_client = client(worker)
        try:
            too_much = TrainConfig(batch_size=1, max_batches=0, epochs=LIMIT // EXAMPLES + 1)
            with pytest.raises(Failure) as refused:
                await worker_client.train(1, too_much, initial_weights(), timeout=10)
            update = await worker_client.train(1, TrainConfig(), initial_weights(), timeout=30)
        finally:
            await worker_client.close()
        assert refused.value.status == "INVALID_ARGUMENT" and refused.value.kind is Kind.INVALID
        assert "--max-examples-per-round" in refused.value.detail and str(LIMIT) in refused.value.detail
        assert update.num_examples == 320, "the reference recipe (10 batches of 32, one epoch) must pass"
    run(scenario)


def test_an_idle_stream_holds_no_lock_and_is_dropped(worker: Process) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(worker.address, options=CHANNEL_OPTIONS) as channel:
            never = asyncio.Event()

            async def nothing() -> AsyncIterator[worker_pb2.TrainRequest]:
                await never.wait()
                yield worker_pb2.TrainRequest()

            idle = worker_pb2_grpc.WorkerStub(channel).Train(nothing(), timeout=60)
            opened = time.monotonic()
            await asyncio.sleep(0.5)
            assert await seconds_until_trained(worker, 5) < 5
            assert await idle.code() == Code.DEADLINE_EXCEEDED
            assert "header" in await idle.details()
            assert time.monotonic() - opened < 15
            never.set()
    run(scenario)


def busy_answers_aborted(worker: Process, metadata: Metadata = ()) -> None:
    """The real coordinator client, still writing its model when the busy worker
    refuses it, hears ABORTED (not INTERNAL: grpc/grpc#36066), every time."""
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(worker.address, options=CHANNEL_OPTIONS) as channel:
            call = await start_training(worker_pb2_grpc.WorkerStub(channel), ENORMOUS, metadata=metadata)
            coordinator = client(worker, metadata=metadata)
            try:
                for _ in range(3):
                    with pytest.raises(Failure) as busy:
                        await coordinator.train(2, SMALL, initial_weights(), timeout=10)
                    assert busy.value.status == "ABORTED", busy.value
                    assert "already training round 1" in busy.value.detail
            finally:
                call.cancel()
                await coordinator.close()
            await seconds_until_trained(worker, 10, metadata)
    run(scenario)


def test_a_busy_worker_answers_aborted_to_the_coordinator(worker: Process) -> None:
    busy_answers_aborted(worker)


def test_a_busy_guarded_worker_answers_aborted_to_the_coordinator(data_dir: Path, tmp_path: Path) -> None:
    """With a token the coordinator writes once admitted, before the header is judged."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    process = start_worker(data_dir, tmp_path, "carol", "--token-file", str(token))
    try:
        busy_answers_aborted(process, bearer_metadata(TOKEN))
    finally:
        codes = stop([process])
    assert codes[process.name] == 0, process.output()


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field; a repeated message field merges into the earlier one."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


@pytest.mark.parametrize("header_extra, name", [
    (field(2, varint(6 << 3) + varint(2**40)), "max_batches"),
    (field(2, varint(5 << 3) + varint(2**32 + 16)), "batch_size"),
    (field(2, varint(7 << 3) + varint(2**32 + 1)), "epochs"),
    (varint(1 << 3) + varint(2**40 + 1), "round"),
], ids=["max_batches-2^40", "batch_size-2^32+16", "epochs-2^32+1", "round-2^40+1"])
def test_a_field_that_overflows_is_refused_not_wrapped(worker: Process, header_extra: bytes, name: str) -> None:
    """Raw protobuf bytes: a varint too wide for a 32-bit field, appended to a valid header."""
    head, *chunks = train_messages(SMALL)
    raw_header = field(1, head.header.SerializeToString() + header_extra)
    with grpc.insecure_channel(worker.address, options=CHANNEL_OPTIONS) as channel:
        rpc = channel.stream_stream("/jetfed.v1.Worker/Train", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            list(rpc(iter([raw_header, *(c.SerializeToString() for c in chunks)]), timeout=30))
    assert refused.value.code() == Code.INVALID_ARGUMENT, refused.value
    assert refused.value.details().startswith(f"{name}:"), refused.value.details()


def test_a_second_run_is_refused_while_the_first_goes_on(worker: Process) -> None:
    async def scenario() -> None:
        first, second = client(worker, run_id="run-first"), client(worker, run_id="run-second")
        try:
            began = time.monotonic()
            await first.train(1, SMALL, initial_weights(), timeout=30)
            interval = time.monotonic() - began
            await first.train(2, SMALL, initial_weights(), timeout=30)
            with pytest.raises(Failure) as refused:
                await second.train(1, SMALL, initial_weights(), timeout=30)
            await first.train(3, SMALL, initial_weights(), timeout=30)
            await asyncio.sleep(2 * interval + 1.0)
            await second.train(1, SMALL, initial_weights(), timeout=30)
        finally:
            await first.close()
            await second.close()
        assert refused.value.status == "FAILED_PRECONDITION" and refused.value.kind is Kind.REFUSED
        assert "run-first" in refused.value.detail and "run-second" in refused.value.detail
        assert "run=run-second" in worker.output()
    run(scenario)


def test_sigterm_exits_within_grace_while_training(data_dir: Path, tmp_path: Path) -> None:
    process = start_worker(data_dir, tmp_path, "bob")

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(process.address, options=CHANNEL_OPTIONS) as channel:
            call = await start_training(worker_pb2_grpc.WorkerStub(channel), ENORMOUS)
            process.popen.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                code = await asyncio.get_running_loop().run_in_executor(None, process.popen.wait, GRACE + 10)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                pytest.fail(f"still running {GRACE + 10:.0f}s after SIGTERM:\n{process.output()[-3000:]}")
            exited = time.monotonic() - signalled
            call.cancel()
        print(f"SIGTERM -> exit under load: {exited:.3f}s (grace {GRACE}s); "
              f"call cut -> loop stopped: {last_stop_seconds(process):.3f}s")
        assert code == 0, process.output()
        assert last_stop_seconds(process) < 1.0
        # The round gets its grace, then the process ends without the interpreter's
        # teardown (1-2 s of torch and gRPC finalization before it was skipped).
        assert exited < GRACE + STOP_MARGIN_S, process.output()
    run(scenario)
