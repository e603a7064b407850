from __future__ import annotations

import asyncio

import pytest
import torch

from jetfed import stream, wire
from jetfed.codec import encode
from jetfed.config import TrainConfig
from jetfed.errors import BadStream, CorruptPayload, InvalidConfig, PayloadTooLarge
from jetfed.v1 import evaluation_pb2, training_pb2, weights_pb2, worker_pb2


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(),
        TrainConfig(optimizer="adam", lr=0.00125, momentum=0.5, batch_size=64, max_batches=0, epochs=3, seed=2**40),
        TrainConfig(proximal_mu=0.01),
        TrainConfig(proximal_mu=1000.0),
        TrainConfig(scaffold=True),
        TrainConfig(scaffold=True, lr=0.05, momentum=0.5, proximal_mu=0.1, seed=9),
    ],
)
def test_config_round_trip(config):
    assert wire.config_from_proto(wire.config_to_proto(config)) == config


def test_config_enums_travel_as_enums():
    message = wire.config_to_proto(TrainConfig(optimizer="adam"))
    assert message.optimizer == training_pb2.OPTIMIZER_ADAM
    assert message.loss == training_pb2.LOSS_NLL


@pytest.mark.parametrize("field", ["optimizer", "loss"])
@pytest.mark.parametrize("value", [0, 99])
def test_unknown_enum_is_named(field, value):
    message = wire.config_to_proto(TrainConfig())
    setattr(message, field, value)
    with pytest.raises(InvalidConfig, match=rf"^{field}: '<enum {value}>'"):
        wire.config_from_proto(message)


def test_out_of_range_field_from_the_wire_is_refused():
    message = wire.config_to_proto(TrainConfig())
    message.batch_size = 0
    with pytest.raises(InvalidConfig, match="^batch_size: "):
        wire.config_from_proto(message)


def test_a_config_without_proximal_mu_trains_without_the_term():
    """The reference recipe as a coordinator from before field 9 writes it."""
    message = training_pb2.TrainConfig(
        optimizer=training_pb2.OPTIMIZER_SGD, loss=training_pb2.LOSS_NLL, lr=0.1, batch_size=32, max_batches=10, epochs=1,
    )
    assert wire.config_from_proto(training_pb2.TrainConfig.FromString(message.SerializeToString())) == TrainConfig()


@pytest.mark.parametrize("mu", [-1.0, float("nan"), 1e9])
def test_a_bad_proximal_mu_from_the_wire_is_refused_by_name(mu):
    message = wire.config_to_proto(TrainConfig())
    message.proximal_mu = mu
    with pytest.raises(InvalidConfig, match="^proximal_mu: "):
        wire.config_from_proto(message)


def test_scaffold_travels_as_field_10_and_its_absence_reads_as_off():
    message = wire.config_to_proto(TrainConfig(scaffold=True))
    assert message.scaffold is True
    parsed = training_pb2.TrainConfig.FromString(message.SerializeToString())
    assert wire.config_from_proto(parsed).scaffold is True
    assert training_pb2.TrainConfig.DESCRIPTOR.fields_by_name["scaffold"].number == 10
    old = wire.config_to_proto(TrainConfig())
    assert "scaffold" not in [field.name for field, _ in old.ListFields()]  # off: not on the wire at all
    assert wire.config_from_proto(old).scaffold is False


def test_scaffold_with_adam_from_the_wire_is_refused_by_name():
    message = wire.config_to_proto(TrainConfig(scaffold=True))
    message.optimizer = training_pb2.OPTIMIZER_ADAM
    with pytest.raises(InvalidConfig, match="^scaffold: needs optimizer 'sgd', not 'adam'"):
        wire.config_from_proto(message)


def sample_manifest_and_payload(size=10):
    state = {"b": torch.zeros(size), "a": torch.ones(2, 3, dtype=torch.float64), "n": torch.tensor(3)}
    return encode(state, "mnist-cnn")


def test_manifest_round_trip():
    manifest, _ = sample_manifest_and_payload()
    message = wire.manifest_to_proto(manifest)
    assert isinstance(message, weights_pb2.WeightManifest)
    assert list(message.tensors[0].shape) == [2, 3]
    assert wire.manifest_from_proto(message) == manifest


def test_manifest_from_proto_sorts_tensors():
    manifest, _ = sample_manifest_and_payload()
    message = wire.manifest_to_proto(manifest)
    reversed_specs = list(reversed(message.tensors))
    del message.tensors[:]
    message.tensors.extend(reversed_specs)
    assert wire.manifest_from_proto(message) == manifest


def train_messages(payload, manifest, chunk_bytes):
    head = worker_pb2.TrainRequest(
        header=worker_pb2.TrainHeader(round=3, manifest=wire.manifest_to_proto(manifest))
    )
    return list(wire.weight_messages(head, payload, chunk_bytes, lambda c: worker_pb2.TrainRequest(chunk=c)))


def read(messages, max_bytes=1 << 20):
    async def source():
        for message in messages:
            yield message

    return asyncio.run(wire.read_weight_stream(source(), "header", max_bytes))


def test_read_weight_stream_happy_path():
    manifest, payload = sample_manifest_and_payload(size=100)
    messages = train_messages(payload, manifest, chunk_bytes=64)
    assert len(messages) == 1 + -(-len(payload) // 64)
    head, received_manifest, received = read(messages)
    assert head.round == 3
    assert received_manifest == manifest
    assert received == payload


def test_first_message_must_be_the_header():
    manifest, payload = sample_manifest_and_payload()
    messages = train_messages(payload, manifest, chunk_bytes=64)
    with pytest.raises(BadStream, match="first message must carry the header, got chunk"):
        read(messages[1:])


def test_header_twice_is_a_bad_stream():
    manifest, payload = sample_manifest_and_payload()
    messages = train_messages(payload, manifest, chunk_bytes=64)
    with pytest.raises(BadStream, match="only chunks may follow"):
        read([messages[0], messages[1], messages[0]] + messages[2:])


def test_empty_stream_is_a_bad_stream():
    with pytest.raises(BadStream, match="ended before the header"):
        read([])


def test_chunks_swapped_are_a_bad_stream():
    manifest, payload = sample_manifest_and_payload()
    head, first, second, *rest = train_messages(payload, manifest, chunk_bytes=64)
    with pytest.raises(BadStream, match="out of order"):
        read([head, second, first] + rest)


def test_stream_cut_short_is_corrupt():
    manifest, payload = sample_manifest_and_payload()
    messages = train_messages(payload, manifest, chunk_bytes=64)
    with pytest.raises(CorruptPayload, match="stream ended after"):
        read(messages[:-1])


def test_oversized_header_is_refused_before_chunks():
    manifest, payload = sample_manifest_and_payload()
    messages = train_messages(payload, manifest, chunk_bytes=64)
    with pytest.raises(PayloadTooLarge):
        read(messages[:1], max_bytes=len(payload) - 1)


def test_read_weight_stream_hashes_the_payload_on_the_way():
    manifest, payload = sample_manifest_and_payload(size=100)
    _, _, received = read(train_messages(payload, manifest, chunk_bytes=64))
    assert received.sha256 == manifest.sha256


def test_weight_messages_without_a_wrapper_fill_the_header_type_in_place():
    manifest, payload = sample_manifest_and_payload(size=100)
    head = worker_pb2.TrainRequest(header=worker_pb2.TrainHeader(round=3, manifest=wire.manifest_to_proto(manifest)))
    in_place = list(wire.weight_messages(head, payload, 64))
    assert [m.SerializeToString() for m in in_place] == [m.SerializeToString() for m in train_messages(payload, manifest, 64)]


@pytest.mark.parametrize("message_type", [worker_pb2.TrainRequest, worker_pb2.TrainResponse,
                                          worker_pb2.InitialWeightsResponse, evaluation_pb2.EvaluateRequest])
def test_a_serialized_chunk_is_every_weight_stream_s_chunk(message_type):
    """The global model's chunks are serialized once and written to Train and Evaluate
    calls alike: that holds while every stream carries its chunk as field 2."""
    payload = bytes(range(200))
    chunks = wire.serialized_chunks(payload, 64)
    assert [size for size, _ in chunks] == [64, 64, 64, 8]
    for (_, raw), (offset, data) in zip(chunks, stream.split(payload, 64)):
        message = message_type.FromString(raw)
        assert message.WhichOneof("kind") == "chunk"
        assert (message.chunk.offset, message.chunk.data) == (offset, data)
        assert raw == message_type(chunk=weights_pb2.WeightChunk(offset=offset, data=data)).SerializeToString()


def test_serialized_messages_pass_chunks_as_they_are_and_count_them():
    head = worker_pb2.TrainRequest(header=worker_pb2.TrainHeader(round=1))
    chunks = wire.serialized_chunks(b"x" * 10, 4)
    counted = []
    written = [wire.pass_serialized(m) for m in wire.serialized_messages(head, chunks, counted.append)]
    assert written == [head.SerializeToString()] + [raw for _, raw in chunks]
    assert counted == [4, 4, 2]
