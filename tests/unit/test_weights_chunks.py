"""The global model is split and serialized once per version, whatever the fleet size."""

from __future__ import annotations

import torch

from coordinator.clients import Weights, _evaluate_messages
from jetfed.v1 import evaluation_pb2


def test_a_model_s_chunks_are_made_once_per_chunk_size():
    weights = Weights.of({"w": torch.arange(100, dtype=torch.float32)}, "m")
    first = weights.chunks(64)
    assert weights.chunks(64) is first
    assert weights.chunks(128) is not first
    assert b"".join(evaluation_pb2.EvaluateRequest.FromString(raw).chunk.data for _, raw in first) == weights.payload


def test_the_cache_is_no_part_of_a_model_s_identity():
    state = {"w": torch.ones(3)}
    sent, fresh = Weights.of(state, "m"), Weights.of(state, "m")
    sent.chunks(8)
    assert sent == fresh


def test_an_evaluation_of_the_global_model_reuses_its_chunks_and_an_update_s_keeps_none():
    global_model = Weights.of({"w": torch.ones(40)}, "m")
    global_model.chunks(64)
    update = Weights.of({"w": torch.zeros(40)}, "m")
    sent = list(_evaluate_messages("global", global_model, 64, lambda n: None))
    assert all(isinstance(m, bytes) for m in sent[1:])
    update_messages = list(_evaluate_messages("alice", update, 64, lambda n: None))
    assert all(isinstance(m, evaluation_pb2.EvaluateRequest) for m in update_messages)
    assert update.cached_chunks(64) is None
    assert b"".join(m.chunk.data for m in update_messages[1:]) == update.payload
