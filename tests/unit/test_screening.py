"""Screening of updates: the example-count bound follows the worker's training loop,
the delta norm ignores integer buffers, and a change over the median multiple is
scaled to the median (which takes three updates to mean anything)."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator import screening
from jetfed.config import TrainConfig
from jetfed.tasks.base import TensorExamples
from jetfed.training import train_round
from jetfed.models import build_model


@pytest.mark.parametrize("batches, batch_size, epochs, size", [(10, 32, 1, 1000), (0, 32, 2, 77), (5, 7, 3, 20),
                                                               (3, 10, 1, 30), (4, 10, 1, 31)])
def test_the_bound_is_what_an_honest_worker_trains_on(batches, batch_size, epochs, size):
    config = TrainConfig(batch_size=batch_size, max_batches=batches, epochs=epochs)
    torch.manual_seed(0)
    data = TensorExamples(torch.randn(size, 1, 28, 28), torch.randint(0, 10, (size,)), torch.device("cpu"))
    honest = train_round(build_model("mnist-cnn"), data, config, seed=1).num_examples
    assert screening.max_examples(config, size) == honest
    assert screening.claim_problem(honest, config, size) is None


@pytest.mark.parametrize("claimed", [0, 321, 2**63 - 1, 2**64 - 1])
def test_an_impossible_claim_names_the_figures(claimed):
    problem = screening.claim_problem(claimed, TrainConfig(batch_size=32, max_batches=10), 4000)
    assert problem == (f"REJECTED: claims {claimed} training examples, the round allows 1..320 "
                       "(10 batches x 32 x 1 epochs over the 4000 examples its GetInfo announced)")


def test_the_delta_norm_covers_floating_tensors_only():
    base = {"w": torch.zeros(2, 2), "n": torch.tensor(0)}
    update = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]]), "n": torch.tensor(1000)}
    assert screening.delta_norm(update, base) == 5.0


def test_a_change_over_the_median_multiple_is_scaled_down_to_the_median_with_its_figures():
    base = {"w": torch.zeros(2), "n": torch.tensor(0)}
    states = {name: {"w": torch.tensor([norm, 0.0]), "n": torch.tensor(7)}
              for name, norm in (("a", 1.0), ("b", 1.2), ("c", 0.9), ("d", 50.0))}
    norms = {name: screening.delta_norm(state, base) for name, state in states.items()}
    averaged, notes = screening.clip_to_bound(states, base, norms, 10.0)
    assert notes == {"d": "delta norm 50 is 45.5x the median 1.1 of the round's 4 updates (over 10x, "
                          "--max-norm-ratio); scaled down to the median"}
    assert torch.allclose(averaged["d"]["w"], torch.tensor([1.1, 0.0])) and int(averaged["d"]["n"]) == 7
    assert all(averaged[name] is states[name] for name in "abc")


def test_changes_within_the_bound_are_averaged_as_sent():
    states = {name: {"w": torch.full((2,), float(i))} for i, name in enumerate("abc", start=1)}
    averaged, notes = screening.clip_to_bound(states, {"w": torch.zeros(2)}, {"a": 1.0, "b": 9.9, "c": 1.0}, 10.0)
    assert notes == {} and all(averaged[name] is states[name] for name in states)


def test_two_updates_cannot_be_told_apart():
    states = {"a": {"w": torch.ones(1)}, "b": {"w": torch.full((1,), 1e9)}}
    assert screening.clip_to_bound(states, {"w": torch.zeros(1)}, {"a": 1.0, "b": 1e9}, 10.0)[1] == {}


def test_a_zero_median_brings_every_change_back_to_the_global_model():
    base = {"w": torch.zeros(1)}
    states = {"a": base, "b": base, "c": {"w": torch.full((1,), 2.0)}}
    averaged, notes = screening.clip_to_bound(states, base, {"a": 0.0, "b": 0.0, "c": 2.0}, 10.0)
    assert list(notes) == ["c"] and "infx the median 0" in notes["c"]
    assert torch.equal(averaged["c"]["w"], torch.zeros(1))
    assert not math.isnan(screening.delta_norm({"w": torch.ones(1)}, {"w": torch.ones(1)}))
