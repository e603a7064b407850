"""Compressed uplink on real `jetfed worker` processes and the coordinator's own gRPC
client: the update a worker sends as an encoded delta is rebuilt, bit for bit, into
the weights the coordinator's decoding of that delta gives; top-k's residual is kept
in --state-dir and used after a restart; an encoding the worker does not know is
refused by name."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import List

import grpc
import pytest
import torch

from coordinator.clients import Update, Weights, WorkerClient
from jetfed import codec, compression, wire
from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.serving import CHANNEL_OPTIONS
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.test_scaffold_worker import start_workers, stopped

RUN = "compression-test-run"
MODEL = "mnist-cnn"


def global_model() -> StateDict:
    torch.manual_seed(0)
    return build_model(MODEL).state_dict()


def train(address: str, round_number: int, encoding: str) -> Update:
    async def call() -> Update:
        client = WorkerClient("alice", address, 256 << 10, run_id=RUN)
        weights = Weights.of(global_model(), MODEL)
        client.expect(MODEL, codec.spec_of(weights.state), 8 << 20)
        try:
            config = TrainConfig(lr=0.1, batch_size=16, max_batches=3, seed=7, uplink_encoding=encoding)
            return await client.train(round_number, config, weights, timeout=60)
        finally:
            await client.close()
    return asyncio.run(call())


def expected(trained: StateDict, encoding: str, residual: "StateDict | None" = None) -> compression.Encoded:
    return compression.encode_delta(trained, global_model(), compression.Encoding.parse(encoding), residual)


def test_encoded_updates_are_rebuilt_exactly_and_topk_keeps_its_residual(tiny_mnist: Path, tmp_path: Path) -> None:
    """One worker process, trained alike for each round (same name, seed and round):
    raw gives the reference, each encoding must rebuild into exactly what decoding
    its delta from the reference gives; top-k's round 2 adds round 1's residual,
    read back from --state-dir."""
    (alice,) = start_workers(tmp_path, {"alice": tmp_path / "state"}, tiny_mnist)
    try:
        full_1 = train(alice.address, 1, "raw")
        sparse_1 = train(alice.address, 1, "topk:0.01")
        quantized_1 = train(alice.address, 1, "int8")
        full_2 = train(alice.address, 2, "raw")
        sparse_2 = train(alice.address, 2, "topk:0.01")
        refused = _refusal(alice.address)
    finally:
        stopped([alice])
    assert full_1.bytes_up == full_1.weights.manifest.total_bytes  # raw: today's full payload
    _check_rebuilt(quantized_1, expected(full_1.weights.state, "int8"))
    assert 3.5 * quantized_1.bytes_up < full_1.bytes_up

    want_1 = expected(full_1.weights.state, "topk:0.01")
    _check_rebuilt(sparse_1, want_1)
    assert 40 * sparse_1.bytes_up < full_1.bytes_up, (sparse_1.bytes_up, full_1.bytes_up)
    assert sparse_1.traffic()["compression_ratio"] > 1.9
    _check_rebuilt(sparse_2, expected(full_2.weights.state, "topk:0.01", want_1.residual))
    assert not _same(sparse_2, expected(full_2.weights.state, "topk:0.01"))  # the residual counted
    kept = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert [name.rsplit("-", 1)[1] for name in kept] == ["1.safetensors", "2.safetensors"], kept
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.uplink_encoding.kind: encoding 42" in refused.details()


@pytest.mark.slow
def test_topk_residual_survives_a_restart(tiny_mnist: Path, tmp_path: Path) -> None:
    (alice,) = start_workers(tmp_path, {"alice": tmp_path / "state"}, tiny_mnist)
    try:
        full_1 = train(alice.address, 1, "raw")
        train(alice.address, 1, "topk:0.01")
        full_2 = train(alice.address, 2, "raw")
    finally:
        stopped([alice])
    (alice,) = start_workers(tmp_path, {"alice-again": tmp_path / "state"}, tiny_mnist)
    try:
        sparse_2 = train(alice.address, 2, "topk:0.01")
    finally:
        stopped([alice])
    residual = expected(full_1.weights.state, "topk:0.01").residual
    _check_rebuilt(sparse_2, expected(full_2.weights.state, "topk:0.01", residual))


def _same(update: Update, want: compression.Encoded) -> bool:
    rebuilt = compression.apply_delta(global_model(), want.sent)
    return all(torch.equal(update.weights.state[n], rebuilt[n]) for n in rebuilt)


def _check_rebuilt(update: Update, want: compression.Encoded) -> None:
    assert _same(update, want)


def _refusal(address: str) -> grpc.aio.AioRpcError:
    manifest, payload = codec.encode(global_model(), MODEL)
    config = wire.config_to_proto(TrainConfig(seed=7))
    config.uplink_encoding.kind = 42  # a newer coordinator's encoding
    header = worker_pb2.TrainHeader(round=3, config=config, manifest=wire.manifest_to_proto(manifest), run_id=RUN)
    messages: List[worker_pb2.TrainRequest] = list(wire.weight_messages(
        worker_pb2.TrainRequest(header=header), payload, 256 << 10, lambda c: worker_pb2.TrainRequest(chunk=c)))

    async def call() -> None:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            [r async for r in stub.Train(iter(messages), timeout=60)]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(call())
    return refused.value


@pytest.mark.slow  # 17 s; jetfed simulate's workers run the same downlink (tests/unit/test_compression.py)
def test_downlink_deltas_from_what_the_worker_holds(tiny_mnist: Path, tmp_path: Path) -> None:
    """The global model goes as a top-k delta from the one the worker got last round;
    the worker trains from what it rebuilt, and the coordinator adds the change that
    training made to the exact global model. A worker that does not hold the base
    refuses the delta, and gets the round again whole."""
    config = TrainConfig(lr=0.1, batch_size=16, max_batches=3, seed=7)
    first = Weights.of(global_model(), MODEL)
    generator = torch.Generator().manual_seed(5)
    second = Weights.of({n: t + 0.01 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
                         for n, t in global_model().items()}, MODEL)
    (alice,) = start_workers(tmp_path, {"alice": tmp_path / "state"}, tiny_mnist)

    async def scenario() -> tuple:
        client = WorkerClient("alice", alice.address, 256 << 10, run_id=RUN)
        plain = WorkerClient("alice", alice.address, 256 << 10, run_id=RUN)
        client.expect(MODEL, codec.spec_of(first.state), 8 << 20, downlink=compression.Encoding.parse("topk:0.01"))
        plain.expect(MODEL, codec.spec_of(first.state), 8 << 20)
        try:
            whole = await client.train(1, config, first, 60)
            sparse = await client.train(2, config, second, 60)
            rebuilt = client._holding
            assert rebuilt is not None
            reference = await plain.train(2, config, Weights.of(rebuilt.state, MODEL), 60)
            client._holding = compression.Held("0" * 64, first.state)  # a base the worker does not hold
            again = await client.train(3, config, second, 60)
        finally:
            await client.close()
            await plain.close()
        return whole, sparse, rebuilt, reference, again

    try:
        whole, sparse, rebuilt, reference, again = asyncio.run(scenario())
    finally:
        stopped([alice])
    assert whole.bytes_down == first.manifest.total_bytes
    assert 40 * sparse.bytes_down < second.manifest.total_bytes, sparse.bytes_down
    assert sparse.traffic()["compression_ratio"] > 1.9
    want = compression.apply_delta(second.state, compression.delta(reference.weights.state, rebuilt.state))
    assert all(torch.equal(sparse.weights.state[n], want[n]) for n in want)
    assert again.bytes_down == second.manifest.total_bytes  # refused as a delta, sent whole
    assert "manifest.base_sha256" in alice.output()


def test_a_worker_that_builds_the_seeded_model_itself_gets_round_1_as_an_empty_delta(
    tiny_mnist: Path, tmp_path: Path,
) -> None:
    """InitialWeights with keep: the worker builds the model for the run's seed, keeps
    it and answers with its manifest alone; round 1 then sends it a delta (empty)
    instead of the whole model, and it trains from the very same values. A worker
    whose build differs from the run's keeps nothing: its round 1 goes whole."""
    config = TrainConfig(lr=0.1, batch_size=16, max_batches=3, seed=7)
    (alice,) = start_workers(tmp_path, {"alice": tmp_path / "state"}, tiny_mnist)

    async def scenario() -> tuple:
        client = WorkerClient("alice", alice.address, 256 << 10, run_id=RUN)
        plain = WorkerClient("alice", alice.address, 256 << 10, run_id=RUN)
        try:
            start = await plain.initial_weights(11, MODEL, "", 8 << 20, 60)
            other = await plain.initial_weights(12, MODEL, "", 8 << 20, 60)
            for proxy in (client, plain):
                proxy.expect(MODEL, codec.spec_of(start.state), 8 << 20)
            client.expect(MODEL, codec.spec_of(start.state), 8 << 20, downlink=compression.Encoding.parse("topk:0.01"))
            refused = await client.keep_initial(11, other, 60)  # the worker's seed-11 build is not `other`
            held_after_refusal = client._holding
            kept = await client.keep_initial(11, start, 60)
            sparse = await client.train(1, config, start, 60)
            whole = await plain.train(1, config, start, 60)
        finally:
            await client.close()
            await plain.close()
        return refused, held_after_refusal, kept, sparse, whole, start

    try:
        refused, held_after_refusal, kept, sparse, whole, start = asyncio.run(scenario())
    finally:
        stopped([alice])
    assert refused is False and held_after_refusal is None
    assert kept is True
    assert whole.bytes_down == start.manifest.total_bytes
    assert 40 * sparse.bytes_down < start.manifest.total_bytes, sparse.bytes_down
    # The worker trained from the same values; the coordinator adds its change to the global
    # model (global + (trained - held)), as after every delta, so only rounding separates them.
    for name, tensor in whole.weights.state.items():
        assert torch.allclose(sparse.weights.state[name], tensor, rtol=0, atol=1e-6), name
    assert "kept as the next delta's base" in alice.output()
