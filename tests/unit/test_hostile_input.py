"""The cheap checks that keep hostile input from costing memory or echoing itself:
payload sizes that follow from the tensors, bounded manifests, clipped details."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from jetfed import codec, stream, wire
from jetfed.errors import BadStream, ManifestMismatch
from jetfed.models import build_model, model_names
from jetfed.status import MAX_DETAILS_BYTES, capped, echo
from jetfed.v1 import evaluation_pb2


@pytest.mark.parametrize("model", model_names())
def test_every_registry_model_encodes_within_its_size_range(model):
    manifest, payload = codec.encode(build_model(model).state_dict(), model)
    shortest, longest = codec.payload_size_range(manifest.tensors)
    assert shortest <= len(payload) <= longest
    assert longest - shortest < 64 + 2 * len(manifest.tensors) * len(str(len(payload))), "the range stays tight"


@pytest.mark.parametrize("state", [
    {},
    {"scalar": torch.tensor(3), "flag": torch.zeros(2, dtype=torch.bool)},
    {"ünïcode\n\"name\"": torch.zeros(3, 4, dtype=torch.float16), "b" * 300: torch.ones(1, dtype=torch.bfloat16)},
    {f"t{i}": torch.zeros(i, dtype=torch.int8) for i in range(40)},
])
def test_odd_names_and_dtypes_encode_within_the_range(state):
    manifest, payload = codec.encode(state, "m")
    shortest, longest = codec.payload_size_range(manifest.tensors)
    assert shortest <= len(payload) <= longest


@pytest.fixture
def weights():
    return codec.encode({"w": torch.zeros(3, 4), "b": torch.zeros(3)}, "m")


@pytest.mark.parametrize("delta", [-1000, 1000, 10 << 20])
def test_a_total_the_tensors_cannot_fill_is_refused(weights, delta):
    manifest, payload = weights
    wrong = replace(manifest, total_bytes=len(payload) + delta)
    with pytest.raises(BadStream, match=rf"total_bytes: {len(payload) + delta} announced.*\d+\.\.\d+ bytes"):
        codec.check_manifest(wrong, "m", manifest.tensors)


def test_duplicate_tensor_names_are_refused(weights):
    manifest, _ = weights
    padded = replace(manifest, tensors=manifest.tensors + (manifest.tensors[0],) * 3)
    with pytest.raises(BadStream, match=r"5 listed but 2 distinct names \('b' 4 times\)"):
        codec.check_manifest(padded, "m", manifest.tensors)


@pytest.mark.parametrize("sha", ["", "0" * 63, "A" * 64, "g" * 64, "0" * 65])
def test_a_malformed_sha256_is_refused_at_the_header(weights, sha):
    manifest, _ = weights
    with pytest.raises(BadStream, match="manifest.sha256: expected 64 lower-case hex digits"):
        codec.check_manifest(replace(manifest, sha256=sha), "m", manifest.tensors)


def test_a_manifest_over_the_tensor_cap_is_refused_before_it_is_built(weights):
    manifest, _ = weights
    message = wire.manifest_to_proto(manifest)
    message.tensors.extend([message.tensors[0]] * wire.MAX_MANIFEST_TENSORS)
    with pytest.raises(BadStream, match=f"{wire.MAX_MANIFEST_TENSORS + 2} listed, more than the"):
        wire.manifest_from_proto(message)


def test_echo_escapes_and_cuts():
    assert echo("conv1.weight") == "conv1.weight"
    assert echo("a\nb\x1b") == "a\\nb\\x1b"
    cut = echo("x" * 10_000)
    assert len(cut) < 120 and cut.endswith("(10000 chars)")


def test_a_long_name_is_cut_in_the_refusal(weights):
    manifest, _ = weights
    renamed = tuple(replace(t, name="n" * 10_000) if t.name == "w" else t for t in manifest.tensors)
    with pytest.raises(ManifestMismatch) as refused:
        codec.check_manifest(replace(manifest, tensors=renamed), "m", manifest.tensors)
    assert len(str(refused.value)) < 300


def test_capped_keeps_short_details_and_cuts_long_ones_at_a_character():
    assert capped("fine") == "fine"
    cut = capped("é" * 1000)
    assert len(cut.encode()) <= MAX_DETAILS_BYTES and cut.endswith("...")


def test_payload_limit_follows_the_model():
    assert stream.payload_limit(10 << 20) == (10 << 20) + (1 << 20) + (1 << 20)


def test_garbage_in_the_stream_is_a_bad_stream():
    """grpc raises the deserializer's DecodeError from the request iterator."""
    async def messages():
        yield evaluation_pb2.EvaluateRequest.FromString(b"\xff\xff")

    with pytest.raises(BadStream, match="message 1 is not valid protobuf"):
        asyncio.run(wire.read_weight_stream(messages(), "header", 1 << 20))
