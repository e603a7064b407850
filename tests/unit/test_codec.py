from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import pytest
import torch

from jetfed.codec import TensorInfo, check_manifest, decode, encode, require_finite, spec_of
from jetfed.errors import CorruptPayload, ManifestMismatch, NonFiniteWeights


def small_state():
    return {
        "fc.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
        "fc.bias": torch.tensor([1.5, -2.25, 3.0], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(2**40 + 3, dtype=torch.int64),
        "half": torch.tensor([0.1, 0.2], dtype=torch.float16),
    }


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip_is_exact_and_keeps_dtypes():
    state = small_state()
    manifest, payload = encode(state, "mnist-cnn")
    assert manifest.model == "mnist-cnn"
    assert manifest.total_bytes == len(payload)
    assert manifest.sha256 == hashlib.sha256(payload).hexdigest()
    assert [t.name for t in manifest.tensors] == sorted(state)
    assert dict((t.name, t.dtype) for t in manifest.tensors)["bn.num_batches_tracked"] == "I64"
    assert_same(decode(manifest, payload), state)


def test_round_trip_of_a_payload_larger_than_4_mib():
    torch.manual_seed(0)
    state = {"big": torch.randn(2_000_000), "steps": torch.tensor(7, dtype=torch.int64)}
    manifest, payload = encode(state, "big")
    assert len(payload) > 4 << 20
    assert_same(decode(manifest, payload), state)


def test_flipped_byte_fails_the_checksum():
    manifest, payload = encode(small_state(), "m")
    broken = bytearray(payload)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(CorruptPayload, match="sha256"):
        decode(manifest, bytes(broken))


def test_truncated_payload_is_corrupt():
    manifest, payload = encode(small_state(), "m")
    with pytest.raises(CorruptPayload, match="bytes received"):
        decode(manifest, payload[:-1])


def test_matching_checksum_over_garbage_is_corrupt():
    manifest, _ = encode(small_state(), "m")
    garbage = b"this is not a safetensors file at all"
    forged = replace(manifest, total_bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    with pytest.raises(CorruptPayload, match="safetensors"):
        decode(forged, garbage)


def test_payload_whose_tensors_differ_from_its_manifest_is_corrupt():
    manifest, _ = encode(small_state(), "m")
    _, other = encode({"x": torch.zeros(2)}, "m")
    forged = replace(manifest, total_bytes=len(other), sha256=hashlib.sha256(other).hexdigest())
    with pytest.raises(CorruptPayload, match="differ"):
        decode(forged, other)


@pytest.fixture
def spec():
    return spec_of(small_state())


@pytest.fixture
def manifest():
    return encode(small_state(), "mnist-cnn")[0]


def test_matching_manifest_passes(manifest, spec):
    check_manifest(manifest, "mnist-cnn", spec)


def test_wrong_model_is_refused(manifest, spec):
    with pytest.raises(ManifestMismatch, match=r"manifest\.model.*'resnet18'"):
        check_manifest(manifest, "resnet18", spec)


def test_wrong_format_is_refused(manifest, spec):
    with pytest.raises(ManifestMismatch, match=r"manifest\.format.*'pickle'"):
        check_manifest(replace(manifest, format="pickle"), "mnist-cnn", spec)


def test_missing_tensor_is_named(manifest, spec):
    short = replace(manifest, tensors=tuple(t for t in manifest.tensors if t.name != "fc.bias"))
    with pytest.raises(ManifestMismatch, match=r"missing 'fc\.bias', unexpected none"):
        check_manifest(short, "mnist-cnn", spec)


def test_unknown_tensor_is_named(manifest, spec):
    extra = replace(manifest, tensors=manifest.tensors + (TensorInfo("evil", "F32", (1,)),))
    with pytest.raises(ManifestMismatch, match=r"missing none, unexpected 'evil'"):
        check_manifest(extra, "mnist-cnn", spec)


def test_renamed_tensor_is_both_missing_and_unexpected(manifest, spec):
    renamed = tuple(TensorInfo("fc.b", t.dtype, t.shape) if t.name == "fc.bias" else t for t in manifest.tensors)
    with pytest.raises(ManifestMismatch, match=r"missing 'fc\.bias', unexpected 'fc\.b'"):
        check_manifest(replace(manifest, tensors=renamed), "mnist-cnn", spec)


def test_wrong_shape_names_the_tensor(manifest, spec):
    tensors = tuple(TensorInfo(t.name, t.dtype, (4, 3)) if t.name == "fc.weight" else t for t in manifest.tensors)
    with pytest.raises(ManifestMismatch, match=r"tensors\['fc\.weight'\].*\[4, 3\].*\[3, 4\]"):
        check_manifest(replace(manifest, tensors=tensors), "mnist-cnn", spec)


def test_wrong_dtype_names_the_tensor(manifest, spec):
    tensors = tuple(TensorInfo(t.name, "F16", t.shape) if t.name == "fc.bias" else t for t in manifest.tensors)
    with pytest.raises(ManifestMismatch, match=r"tensors\['fc\.bias'\]: got F16.*expected F64"):
        check_manifest(replace(manifest, tensors=tensors), "mnist-cnn", spec)


def test_unsupported_dtype_cannot_be_encoded():
    with pytest.raises(ManifestMismatch, match="complex"):
        encode({"z": torch.zeros(2, dtype=torch.complex64)}, "m")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_name_the_tensor(bad):
    state = small_state()
    state["fc.weight"][1, 2] = bad
    with pytest.raises(NonFiniteWeights, match=r"from bob: tensor 'fc\.weight'"):
        require_finite(state, who="bob")


def test_non_finite_half_precision_is_caught():
    state = {"half": torch.tensor([1.0, math.inf], dtype=torch.float16)}
    with pytest.raises(NonFiniteWeights, match="'half'"):
        require_finite(state)


def test_finite_weights_and_integer_buffers_pass():
    state = small_state()
    state["counts"] = torch.tensor([torch.iinfo(torch.int64).max, -1])
    require_finite(state)
