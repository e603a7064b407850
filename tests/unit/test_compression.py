"""The arithmetic of jetfed.compression: round-trip errors within the stated bounds,
exact sizes, error feedback, and hostile payloads refused by name."""

from __future__ import annotations

import pytest
import torch

from jetfed import codec, compression, wire
from jetfed.compression import BadEncoding, Encoding, UnknownEncoding
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig
from jetfed.v1 import weights_pb2


def _state(seed: int = 0) -> codec.StateDict:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "fc.weight": torch.randn(10, 50, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def _round_trip(state: codec.StateDict, encoding: Encoding) -> codec.StateDict:
    payload = compression.encode(state, encoding)
    spec = codec.spec_of(state)
    assert codec.spec_of(payload) == compression.payload_spec(spec, encoding)
    return compression.decode(payload, spec, encoding)


@pytest.mark.parametrize("text", ["raw", "fp16", "bf16", "int8", "int8-channel", "topk:0.1", "topk:1"])
def test_parse_round_trips_through_the_wire(text: str) -> None:
    encoding = Encoding.parse(text)
    assert str(encoding) in (text, "topk:1.0")
    assert wire.encoding_from_proto(wire.encoding_to_proto(encoding), "x") == encoding
    config = TrainConfig(uplink_encoding=str(encoding))
    assert wire.config_from_proto(wire.config_to_proto(config)).uplink_encoding == str(encoding)


@pytest.mark.parametrize("text", ["gzip", "topk", "topk:0", "topk:1.5", "topk:nan", "int8:3", ""])
def test_bad_settings_are_refused_by_name(text: str) -> None:
    with pytest.raises(InvalidConfig, match="uplink_encoding"):
        Encoding.parse(text)


def test_unknown_wire_encoding_is_refused_not_misread() -> None:
    message = weights_pb2.WeightEncoding(kind=99)
    with pytest.raises(UnknownEncoding, match="manifest.encoding.kind: encoding 99"):
        wire.encoding_from_proto(message, "manifest.encoding")
    assert UnknownEncoding.code.name == "FAILED_PRECONDITION"
    manifest = weights_pb2.WeightManifest(model="m", format="safetensors", content=7)
    with pytest.raises(UnknownEncoding, match="manifest.content"):
        wire.manifest_from_proto(manifest)


def test_zero_values_are_full_raw() -> None:
    manifest = wire.manifest_from_proto(weights_pb2.WeightManifest(model="m", format="safetensors"))
    assert (manifest.content, manifest.encoding) == ("full", "raw")


def test_raw_is_exact_and_other_dtypes_travel_raw() -> None:
    state = _state()
    for text in ("raw", "fp16", "int8", "topk:0.1"):
        out = _round_trip(state, Encoding.parse(text))
        assert torch.equal(out["bn.num_batches_tracked"], state["bn.num_batches_tracked"])
    out = _round_trip(state, Encoding.parse("raw"))
    assert all(torch.equal(out[n], state[n]) for n in state)


@pytest.mark.parametrize("text,relative", [("fp16", 2 ** -11), ("bf16", 2 ** -8)])
def test_half_precision_within_its_rounding(text: str, relative: float) -> None:
    state = _state()
    out = _round_trip(state, Encoding.parse(text))
    for name in ("conv.weight", "fc.weight"):
        assert out[name].dtype == torch.float32
        assert bool(((out[name] - state[name]).abs() <= state[name].abs() * relative + 1e-7).all())


def test_fp16_refuses_values_it_cannot_hold() -> None:
    with pytest.raises(BadEncoding, match="fp16's range"):
        compression.encode({"w": torch.tensor([1e6])}, Encoding.parse("fp16"))


@pytest.mark.parametrize("text", ["int8", "int8-channel"])
def test_int8_error_is_at_most_half_a_step(text: str) -> None:
    state = _state()
    out = _round_trip(state, Encoding.parse(text))
    for name in ("conv.weight", "fc.weight", "conv.bias"):
        step = state[name].abs().max() / 127
        assert float((out[name] - state[name]).abs().max()) <= float(step) / 2 * (1 + 1e-5)


def test_int8_per_channel_beats_per_tensor_with_one_loud_channel() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 0.01
    w[5] *= 1000
    state = {"w": w}
    per_tensor = _round_trip(state, Encoding.parse("int8"))["w"]
    per_channel = _round_trip(state, Encoding.parse("int8-channel"))["w"]
    quiet = torch.arange(16) != 5
    err_tensor = float((per_tensor - w)[quiet].abs().mean())
    err_channel = float((per_channel - w)[quiet].abs().mean())
    assert err_channel * 50 < err_tensor


def test_topk_keeps_exactly_k_largest() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    encoding = Encoding.parse("topk:0.05")
    payload = compression.encode({"x": x}, encoding)
    assert payload["x"].shape == (50,) and payload["mask/x"].shape == (125,)  # 125 bytes < 50 int32 indices
    assert compression.topk_count(1000, 0.05) == 50
    out = compression.decode(payload, codec.spec_of({"x": x}), encoding)["x"]
    assert int((out != 0).sum()) <= 50
    expected = sorted(torch.topk(x.abs(), 50).indices.tolist())
    bits = [(int(payload["mask/x"][i // 8]) >> (i % 8)) & 1 for i in range(1000)]
    assert [i for i, b in enumerate(bits) if b] == expected
    kept = out[expected]
    assert float((kept - x[expected]).abs().max()) <= float(x.abs().max()) / 254 * (1 + 1e-5)
    sparse = compression.encode({"x": x}, Encoding.parse("topk:0.01"))  # 10 indices, 40 bytes < 125
    assert sorted(sparse["index/x"].tolist()) == sparse["index/x"].tolist() == sorted(
        torch.topk(x.abs(), 10).indices.tolist())


def test_hostile_masks_are_refused() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    encoding = Encoding.parse("topk:0.05")
    payload = compression.encode({"x": x}, encoding)
    spec = codec.spec_of({"x": x})
    extra = payload["mask/x"].clone()
    extra[0] = 255
    with pytest.raises(BadEncoding, match="marks .* positions, not the 50"):
        compression.decode(dict(payload, **{"mask/x": extra}), spec, encoding)
    odd = {"x": torch.randn(1001)}  # 126 bytes, 7 bits past the end
    payload = compression.encode(odd, encoding)
    past = payload["mask/x"].clone()
    past[-1] |= 0x80
    with pytest.raises(BadEncoding, match="past the tensor's 1001 elements"):
        compression.decode(dict(payload, **{"mask/x": past}), codec.spec_of(odd), encoding)


def test_topk_of_a_tiny_tensor_keeps_one() -> None:
    assert compression.topk_count(3, 0.01) == 1
    assert compression.topk_count(0, 0.01) == 0


def test_residual_carries_mass_across_rounds() -> None:
    """What top-k does not send one round is sent later: over many rounds the sum
    decoded equals the sum of the deltas, short of the last residual only."""
    encoding = Encoding.parse("topk:0.1")
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(200)}
    residual = None
    total_delta = torch.zeros(200)
    total_sent = torch.zeros(200)
    for _ in range(30):
        step = torch.randn(200, generator=g) * 0.1
        encoded = compression.encode_delta({"w": base["w"] + step}, base, encoding, residual)
        residual = encoded.residual
        total_delta += step
        total_sent += encoded.sent["w"]
        assert torch.allclose(total_sent + residual["w"], total_delta, atol=1e-5)
    without = torch.zeros(200)
    # without the residual, the same deltas leave much more behind
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        step = torch.randn(200, generator=g) * 0.1
        without += compression.encode_delta({"w": base["w"] + step}, base, encoding).sent["w"]
    assert float((total_sent - total_delta).norm()) < 0.5 * float((without - total_delta).norm())


def test_delta_round_trip_rebuilds_the_trained_state() -> None:
    base = _state(0)
    trained = {n: (t + 0.01 * torch.ones_like(t) if t.is_floating_point() else t + 1) for n, t in base.items()}
    encoded = compression.encode_delta(trained, base, Encoding.parse("int8"))
    spec = codec.spec_of(trained)
    full = compression.apply_delta(base, compression.decode(encoded.payload, spec, Encoding.parse("int8")))
    assert torch.equal(full["bn.num_batches_tracked"], trained["bn.num_batches_tracked"])
    assert torch.allclose(full["fc.weight"], trained["fc.weight"], atol=1e-4)


def test_encoding_is_deterministic() -> None:
    state = _state()
    for text in ("fp16", "int8-channel", "topk:0.2"):
        a = compression.encode(state, Encoding.parse(text))
        b = compression.encode(state, Encoding.parse(text))
        assert all(torch.equal(a[n], b[n]) for n in a)


def _topk_payload() -> tuple:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    encoding = Encoding.parse("topk:0.005")  # 5 of 1000: 20 bytes of indices, 125 of mask
    return compression.encode({"x": x}, encoding), codec.spec_of({"x": x}), encoding


@pytest.mark.parametrize("index,match", [
    ([0, 1, 2, 3, 1000], "outside 0..999"),
    ([-1, 1, 2, 3, 4], "outside 0..999"),
    ([0, 1, 1, 3, 4], "strictly increasing"),
    ([4, 3, 2, 1, 0], "strictly increasing"),
])
def test_hostile_indices_are_refused(index: list, match: str) -> None:
    payload, spec, encoding = _topk_payload()
    payload["index/x"] = torch.tensor(index, dtype=torch.int32)
    with pytest.raises(BadEncoding, match=match):
        compression.decode(payload, spec, encoding)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_bad_scales_are_refused(scale: float) -> None:
    payload, spec, encoding = _topk_payload()
    payload["scale/x"] = torch.tensor([scale])
    with pytest.raises(BadEncoding, match="NaN, infinite or negative"):
        compression.decode(payload, spec, encoding)


def test_wrong_sizes_and_strays_are_refused() -> None:
    payload, spec, encoding = _topk_payload()
    short = dict(payload, x=payload["x"][:4])
    with pytest.raises(BadEncoding, match="expected torch.int8\\[5\\]"):
        compression.decode(short, spec, encoding)
    with pytest.raises(BadEncoding, match="missing"):
        compression.decode({k: v for k, v in payload.items() if k != "scale/x"}, spec, encoding)
    with pytest.raises(BadEncoding, match="unexpected"):
        compression.decode(dict(payload, y=torch.zeros(1)), spec, encoding)
    state = {"w": torch.randn(4, 4)}
    int8 = compression.encode(state, Encoding.parse("int8-channel"))
    int8["scale/w"] = torch.ones(3)
    with pytest.raises(BadEncoding, match="scale/w"):
        compression.decode(int8, codec.spec_of(state), Encoding.parse("int8-channel"))


def test_encoded_payload_passes_the_codec_and_its_manifest_check() -> None:
    state = _state()
    encoding = Encoding.parse("topk:0.1")
    manifest, payload = codec.encode(compression.encode(state, encoding), "m")
    codec.check_manifest(manifest, "m", compression.payload_spec(codec.spec_of(state), encoding))
    decoded = codec.decode_finite(manifest, payload)
    out = compression.decode(decoded, codec.spec_of(state), encoding)
    assert set(out) == set(state)
    full_bytes = codec.encode(state, "m")[0].total_bytes
    assert manifest.total_bytes * 2 < full_bytes  # tiny tensors: the JSON header dominates


def test_traffic_is_recorded_for_prometheus_and_metrics() -> None:
    from prometheus_client import generate_latest

    from coordinator.clients import Update, Weights
    from jetfed.telemetry import RunTelemetry

    telemetry = RunTelemetry()
    telemetry.observe_traffic("alice", 1000, 50, 1000, 1000)
    text = generate_latest(telemetry.registry).decode()
    assert 'jetfed_update_bytes_total{direction="received",worker="alice"} 50.0' in text
    assert 'jetfed_compression_ratio{worker="alice"} ' + repr(2000 / 1050) in text
    update = Update("alice", Weights.of({"w": torch.zeros(3)}, "m"), 1, 0.0, 0.0, "cpu", bytes_down=1000, bytes_up=50,
                    raw_up=1000)
    assert update.traffic() == {"bytes_sent": 1000, "bytes_received": 50, "compression_ratio": 2000 / 1050}


def test_run_settings_refuse_an_unknown_downlink_encoding(tmp_path) -> None:
    from coordinator.settings import RunSettings

    with pytest.raises(InvalidConfig, match="downlink_encoding: 'gzip' is not one of"):
        RunSettings(workers={"a": "h:1"}, evaluator=None, out_dir=tmp_path, downlink_encoding="gzip").validated()
    with pytest.raises(InvalidConfig, match="uplink_encoding: 'topk:2' |top-k fraction 2.0"):
        TrainConfig(uplink_encoding="topk:2").validated()


def test_flags_and_federation_toml_reach_the_settings(tmp_path) -> None:
    from coordinator import cli

    config = tmp_path / "federation.toml"
    config.write_text('[federation]\nuplink_encoding = "int8"\ndownlink_encoding = "topk:0.05"\n')
    settings = cli.settings_from(cli.parse_args(["--config", str(config), "--worker", "a=h:1"]))
    assert (settings.train.uplink_encoding, settings.downlink_encoding) == ("int8", "topk:0.05")
    settings = cli.settings_from(cli.parse_args(["--config", str(config), "--worker", "a=h:1",
                                                 "--uplink-encoding", "topk:0.01", "--downlink-encoding", "raw"]))
    assert (settings.train.uplink_encoding, settings.downlink_encoding) == ("topk:0.01", "raw")
    assert cli.settings_from(cli.parse_args(["--worker", "a=h:1"])).downlink_encoding == "raw"
    with pytest.raises(InvalidConfig, match="uplink_encoding: 'zip'"):
        cli.settings_from(cli.parse_args(["--worker", "a=h:1", "--uplink-encoding", "zip"]))
