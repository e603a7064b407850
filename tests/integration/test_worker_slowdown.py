"""`jetfed worker --slowdown F` over real gRPC: two real worker processes on the same
data, one at its own speed and one emulating a board three times slower."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, List, Tuple

import grpc
import pytest
import torch

from jetfed import codec, wire
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.serving import CHANNEL_OPTIONS
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.processes import START_TIMEOUT_S, Process, start, stop, wait_serving

SLOWDOWN = 3.0
# About 0.2 s of compute on one core (240 examples): long enough that timer noise is small.
ROUND = TrainConfig(batch_size=16, max_batches=0, epochs=1, seed=3)
# Seconds of compute, so the emulated wait after it is long enough to cancel inside.
LONG_ROUND = TrainConfig(batch_size=16, max_batches=0, epochs=4, seed=3)
EMULATED = re.compile(r"train round=(\d+) computed=([0-9.]+)s emulated=([0-9.]+)s slowdown=3\b")


@pytest.fixture(scope="module")
def workers(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Process, Process]]:
    logs = tmp_path_factory.mktemp("slowdown-logs")
    common = ["--labels", "0-3", "--data-dir", str(tiny_mnist), "--no-download", "--threads", "1"]
    plain = start("plain", ["worker", "--name", "plain", *common], logs)
    slow = start("slow", ["worker", "--name", "slow", *common, "--slowdown", str(SLOWDOWN)], logs)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        wait_serving(plain, deadline)
        wait_serving(slow, deadline)
        yield plain, slow
    finally:
        codes = stop([plain, slow])
    assert codes == {"plain": 0, "slow": 0}, f"{plain.output()}\n{slow.output()}"


def train_messages(config: TrainConfig, round_number: int) -> List[worker_pb2.TrainRequest]:
    torch.manual_seed(0)
    manifest, payload = codec.encode(build_model("mnist-cnn").state_dict(), "mnist-cnn")
    header = worker_pb2.TrainHeader(
        round=round_number, config=wire.config_to_proto(config), manifest=wire.manifest_to_proto(manifest),
    )
    return list(wire.weight_messages(
        worker_pb2.TrainRequest(header=header), payload, 64 << 10, lambda c: worker_pb2.TrainRequest(chunk=c),
    ))


async def messages(config: TrainConfig, round_number: int) -> AsyncIterator[worker_pb2.TrainRequest]:
    for message in train_messages(config, round_number):
        yield message


async def train(process: Process, config: TrainConfig, round_number: int) -> Tuple[float, float]:
    """One whole Train call: (the train_seconds the worker reported, the call's wall seconds)."""
    async with grpc.aio.insecure_channel(process.address, options=CHANNEL_OPTIONS) as channel:
        started = time.monotonic()
        replies = [reply async for reply in worker_pb2_grpc.WorkerStub(channel).Train(
            messages(config, round_number), timeout=60)]
        wall = time.monotonic() - started
    return replies[0].result.train_seconds, wall


def test_a_slowed_worker_reports_and_takes_three_times_the_compute(workers: Tuple[Process, Process]) -> None:
    plain, slow = workers

    async def scenario() -> Tuple[List[float], List[Tuple[float, float]]]:
        # Alternated, so a busy moment of the shared machine hits both workers alike.
        plain_seconds, slow_rounds = [], []
        for round_number in (1, 2):
            plain_seconds.append((await train(plain, ROUND, round_number))[0])
            slow_rounds.append(await train(slow, ROUND, round_number))
        return plain_seconds, slow_rounds

    plain_seconds, slow_rounds = asyncio.run(asyncio.wait_for(scenario(), 60))
    reported = [seconds for seconds, _ in slow_rounds]
    print(f"plain train_seconds {plain_seconds}; slowed {SLOWDOWN:g}x: reported {reported}, "
          f"call wall {[round(wall, 3) for _, wall in slow_rounds]}")
    # Across two processes the same compute differs by up to ~20% on a shared 2-core machine
    # (CI once measured the slowed worker's own compute 0.21 s against plain's 0.26 s); the
    # exact 3x of its own compute is checked from its log below.
    assert min(reported) >= 2 * min(plain_seconds)
    for seconds, wall in slow_rounds:
        assert wall >= seconds  # the wait was real, not only reported
    logged = [match for match in EMULATED.findall(slow.output()) if match[0] in ("1", "2")]
    assert len(logged) == 2, slow.output()[-3000:]
    for (_, computed, emulated), seconds in zip(logged, reported):  # exactly 3x its own compute
        assert float(emulated) == pytest.approx(2 * float(computed), abs=0.002)
        assert seconds == pytest.approx(float(computed) + float(emulated), rel=0.05, abs=0.01)
    assert "emulating a board 3x slower: --slowdown 3" in slow.output()
    assert "emulating" not in plain.output()


def test_a_cancelled_call_ends_the_emulated_wait_at_once(workers: Tuple[Process, Process]) -> None:
    _, slow = workers

    async def scenario() -> Tuple[float, float]:
        async with grpc.aio.insecure_channel(slow.address, options=CHANNEL_OPTIONS) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Train(messages(LONG_ROUND, 7), timeout=60)
            waiting = await emulated_wait_of(slow, round_number=7, limit=30)
            call.cancel()
            cancelled = time.monotonic()
            await train_once_free(slow, ROUND, 8, within=waiting)
            return waiting, time.monotonic() - cancelled

    waiting, next_round = asyncio.run(asyncio.wait_for(scenario(), 60))
    print(f"emulated wait of {waiting:.3f}s cancelled; the next round answered {next_round:.3f}s later")
    assert next_round < waiting
    assert not re.search(r"train round=7 run=\S+ examples=", slow.output()), "round 7 answered after its cancel"


async def train_once_free(process: Process, config: TrainConfig, round_number: int, within: float) -> None:
    """Train, retrying while the worker is still busy (ABORTED), for at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            await train(process, config, round_number)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def emulated_wait_of(process: Process, round_number: int, limit: float) -> float:
    """The emulated wait the worker logs once `round_number`'s training is done."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for found, _, emulated in EMULATED.findall(process.output()):
            if int(found) == round_number:
                return float(emulated)
        await asyncio.sleep(0.02)
    pytest.fail(f"round {round_number} never reached its emulated wait:\n{process.output()[-3000:]}")
