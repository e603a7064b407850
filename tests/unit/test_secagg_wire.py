"""Secure aggregation through its protobuf border (jetfed.secagg.proto) and the update
layout both sides derive (jetfed.secagg.update): three workers' SecAggWorker (the
service's side, as worker.service drives it) and a SecAggServer exchange only wire
messages, and the coordinator's mean equals the plaintext weighted mean within the
fixed-point step."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from jetfed import codec
from jetfed.secagg import FixedPoint, ProtocolViolation, SecAggServer, proto, update
from jetfed.v1 import secagg_pb2
from worker.secagg_service import SecAggWorker

NAMES = ("alice", "bob", "charlie")
RUN = "run-1"


def state(seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"b": torch.randn(3, generator=generator), "w": torch.randn(4, 5, generator=generator),
            "count": torch.tensor(7)}


def setup(tmp_path: Path, fixed_point: FixedPoint, length: int):
    server = SecAggServer(run_id=RUN, threshold=2, fixed_point=fixed_point, length=length)
    workers = {n: SecAggWorker(n, tmp_path / n) for n in NAMES}
    request = secagg_pb2.SecAggAdvertiseRequest(run_id=RUN, encoding=proto.encoding_to_proto(fixed_point))
    for worker in workers.values():
        server.receive_advertisement(proto.advertisement_from_proto(worker.advertise(request)))
    roster = proto.roster_to_proto(server.roster())
    for worker in workers.values():
        reply = worker.share_keys(secagg_pb2.SecAggShareKeysRequest(roster=roster))
        server.receive_key_shares(proto.key_shares_from_proto(reply))
    return server, workers


def test_a_round_over_the_wire_gives_the_weighted_mean(tmp_path: Path) -> None:
    base = state(0)
    trained = {n: {k: (v + 0.01 * (i + 1) * torch.ones_like(v) if v.is_floating_point() else v)
                   for k, v in base.items()} for i, n in enumerate(NAMES)}
    examples = {"alice": 100, "bob": 300, "charlie": 50}
    spec = codec.spec_of(base)
    length = update.vector_length(spec)
    fixed_point = FixedPoint.for_fleet(1.0, 3)
    server, workers = setup(tmp_path, fixed_point, length)
    start = server.start_round(1, NAMES)
    message = proto.round_start_to_proto(start, server.roster(), weight_unit=400.0)
    for name, worker in workers.items():
        worker.check_round(RUN, message, scaffold=False)
        manifest, payload, masked = worker.masked_result(RUN, message, base, trained[name], examples[name], "m")
        (tensor,) = codec.decode(manifest, payload).values()
        vector = tensor.numpy().view(np.uint32).copy()
        server.receive_masked_input(proto.masked_input_from_proto(name, masked, vector))
    for holder, request in server.close_masked_inputs(1).items():
        reply = workers[holder].unmask(proto.unmask_request_to_proto(RUN, request))
        server.receive_unmask_response(proto.unmask_response_from_proto(reply))
    aggregate = server.finish(1)
    mean, weights = update.mean_state(base, aggregate.values)
    total = sum(examples.values())
    assert weights == pytest.approx(total / 400.0, abs=3 / fixed_point.scale)
    for key in ("b", "w"):
        expected = sum(examples[n] * (trained[n][key].double() - base[key].double()) for n in NAMES) / total
        assert torch.allclose(mean[key].double() - base[key].double(), expected, atol=1e-6)
    assert torch.equal(mean["count"], base["count"])


def test_a_restarted_worker_advertises_a_later_epoch(tmp_path: Path) -> None:
    fixed_point = FixedPoint.for_fleet(1.0, 3)
    request = secagg_pb2.SecAggAdvertiseRequest(run_id=RUN, encoding=proto.encoding_to_proto(fixed_point))
    first = SecAggWorker("alice", tmp_path).advertise(request)
    again = SecAggWorker("alice", tmp_path).advertise(request)  # a new process, same --state-dir
    assert again.epoch == first.epoch + 1
    assert SecAggWorker("alice", tmp_path).advertise(
        secagg_pb2.SecAggAdvertiseRequest(run_id=RUN, encoding=request.encoding, min_epoch=10)).epoch == 10


def test_an_unknown_share_kind_is_refused_at_the_border() -> None:
    with pytest.raises(ProtocolViolation, match="share kind"):
        proto.share_from_proto(secagg_pb2.EncryptedShare(owner="a", holder="b", kind=0))
