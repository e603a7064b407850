"""The codec's own safetensors writer and reader: the bytes safetensors' writer gives,
tensors that map the received payload instead of copying it, every malformed layout
that safetensors' loader refuses refused too, and the finiteness check by runs."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from jetfed.codec import Manifest, decode, decode_finite, encode, spec_of
from jetfed.errors import CorruptPayload, NonFiniteWeights
from jetfed.models import build_model
from jetfed.stream import PayloadAssembler, split


def odd_state():
    return {
        "b": torch.ones(3),
        "flag": torch.tensor([True, False, True]),
        "c": torch.ones(1, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "é": torch.tensor([0.5, -2.0], dtype=torch.float16),
        "scalar": torch.tensor(3.0),
        "bf": torch.full((2, 2), 1.5, dtype=torch.bfloat16),
        "u": torch.arange(5, dtype=torch.uint8),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i32": torch.tensor([7, 8], dtype=torch.int32),
        "count": torch.tensor(2**40 + 3),
        "strided": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    }


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("make", [odd_state, lambda: build_model("mnist-cnn").state_dict()], ids=["odd", "mnist-cnn"])
def test_encode_writes_what_safetensors_writes(make):
    state = make()
    manifest, payload = encode(state, "m")
    assert bytes(payload) == st_save({k: v.contiguous() for k, v in state.items()})
    assert manifest.sha256 == hashlib.sha256(payload).hexdigest()
    assert_same(st_load(bytes(payload)), state)


def received(payload) -> bytearray:
    """The payload as a receiver holds it: assembled from chunks, hashed on the way."""
    assembler = PayloadAssembler(len(payload), max_bytes=len(payload))
    for offset, data in split(bytes(payload), 7):
        assembler.add(offset, data)
    return assembler.finish()


def test_a_received_payload_decodes_into_tensors_that_map_it():
    state = odd_state()
    manifest, payload = encode(state, "m")
    buffer = received(payload)
    decoded = decode(manifest, buffer, buffer.sha256)
    assert_same(decoded, state)
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    mapped = [n for n, t in decoded.items() if t.numel() and start <= t.data_ptr() < start + len(buffer)]
    assert sorted(mapped) == sorted(n for n, t in state.items() if t.numel() and t.dtype != torch.bool)


def test_bytes_decode_as_before():
    state = odd_state()
    manifest, payload = encode(state, "m")
    assert_same(decode(manifest, bytes(payload)), state)


def test_a_digest_taken_on_the_way_that_differs_is_refused():
    manifest, payload = encode(odd_state(), "m")
    buffer = received(payload)
    with pytest.raises(CorruptPayload, match="sha256 0{64} does not match"):
        decode(manifest, buffer, "0" * 64)


def test_a_changed_byte_is_refused_by_the_digest_taken_on_the_way():
    manifest, payload = encode(odd_state(), "m")
    payload[-1] ^= 1
    buffer = received(payload)
    with pytest.raises(CorruptPayload, match="does not match manifest"):
        decode(manifest, buffer, buffer.sha256)


def layout(entries, data: bytes, header_extra: bytes = b"", length_delta: int = 0) -> bytes:
    text = json.dumps(entries, separators=(",", ":")).encode() + header_extra
    return struct.pack("<Q", len(text) + length_delta) + text + data


def as_received(raw: bytes):
    """A manifest that matches `raw` byte for byte, so only its layout is judged."""
    return Manifest(model="m", tensors=(), total_bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()), bytearray(raw)


FOUR_FLOATS = struct.pack("<4f", 1, 2, 3, 4)
MALFORMED = {
    "short": b"\x01\x02",
    "header past the end": layout({}, b"", length_delta=100),
    "not json": layout({}, b"", header_extra=b"{"),
    "not an object": struct.pack("<Q", 2) + b"[]",
    "unknown dtype": layout({"a": {"dtype": "F8", "shape": [4], "data_offsets": [0, 4]}}, FOUR_FLOATS[:4]),
    "negative size": layout({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, FOUR_FLOATS[:4]),
    "offsets disagree": layout({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, FOUR_FLOATS[:12]),
    "gap": layout({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, FOUR_FLOATS[:12]),
    "overlap": layout({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, FOUR_FLOATS[:12]),
    "trailing bytes": layout({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, FOUR_FLOATS[:8]),
    "missing data": layout({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, FOUR_FLOATS[:8]),
    "extra key": layout({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, FOUR_FLOATS[:4]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_layout_is_corrupt(case):
    raw = MALFORMED[case]
    manifest, buffer = as_received(raw)
    with pytest.raises(CorruptPayload, match="^payload: not a valid safetensors file: "):
        decode(manifest, buffer, manifest.sha256)
    if case != "extra key":  # safetensors ignores keys it does not know; no writer adds any
        with pytest.raises(Exception, match="Error while deserializing"):
            st_load(raw)


def test_a_repeated_name_is_corrupt():
    text = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    raw = struct.pack("<Q", len(text)) + text + FOUR_FLOATS[:4]
    manifest, buffer = as_received(raw)
    with pytest.raises(CorruptPayload, match="not JSON"):
        decode(manifest, buffer)


def test_a_misaligned_tensor_and_odd_bools_still_decode_as_safetensors_does():
    """A writer other than safetensors may misalign a tensor; bool bytes other than 0/1
    read as True. Either is copied, never mapped."""
    entries = {"flag": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]},
               "x": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    raw = layout(entries, b"\x00\x02\x01" + FOUR_FLOATS[:8])
    manifest, buffer = as_received(raw)
    manifest = Manifest("m", spec_of({"flag": torch.zeros(3, dtype=torch.bool), "x": torch.zeros(2)}),
                        manifest.total_bytes, manifest.sha256)
    state = decode(manifest, buffer)
    assert state["flag"].tolist() == [False, True, True]
    assert state["x"].tolist() == [1.0, 2.0]


def test_a_nan_in_the_middle_of_a_run_names_its_tensor():
    state = {f"t{i}": torch.ones(100) for i in range(5)}
    state["t3"][50] = float("nan")
    manifest, payload = encode(state, "m")
    with pytest.raises(NonFiniteWeights, match="weights from alice: tensor 't3' holds NaN or Inf"):
        decode_finite(manifest, received(payload), who="alice")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_an_inf_of_any_floating_type_is_found(dtype):
    state = {"a": torch.ones(3, dtype=dtype), "b": torch.ones(3, dtype=dtype)}
    state["b"][1] = float("-inf")
    manifest, payload = encode(state, "m")
    with pytest.raises(NonFiniteWeights, match="'b'"):
        decode_finite(manifest, received(payload))
    with pytest.raises(NonFiniteWeights, match="'b'"):
        decode_finite(manifest, bytes(payload))


def test_finite_values_whose_sum_overflows_pass():
    state = {"a": torch.full((10,), 3e38), "b": torch.full((3,), 3e38), "h": torch.full((4,), 60000.0).half()}
    manifest, payload = encode(state, "m")
    assert_same(decode_finite(manifest, received(payload)), state)
