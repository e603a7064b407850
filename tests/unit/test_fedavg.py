from __future__ import annotations

import pytest
import torch

from coordinator.strategies.fedavg import fedavg


def test_weighted_mean_matches_hand_computation():
    a = {"w": torch.tensor([1.0, -2.0, 4.0]), "b": torch.tensor([[0.0, 8.0]])}
    b = {"w": torch.tensor([5.0, 2.0, 0.0]), "b": torch.tensor([[4.0, 0.0]])}
    out = fedavg([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([4.0, 1.0, 1.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0, 2.0]]))
    assert out["w"].dtype == torch.float32


def test_equal_weights_give_the_plain_mean():
    states = [{"w": torch.tensor([float(i), 10.0 * i], dtype=torch.float64)} for i in (1, 2, 6)]
    out = fedavg(states, [1.0, 1.0, 1.0])
    assert torch.equal(out["w"], torch.tensor([3.0, 30.0], dtype=torch.float64))


def test_single_state_comes_back_unchanged():
    state = {"w": torch.randn(4, 5)}
    assert torch.equal(fedavg([state], [60000])["w"], state["w"])


def test_integer_buffers_are_rounded_and_keep_their_dtype():
    states = [{"n": torch.tensor(10, dtype=torch.int64)}, {"n": torch.tensor(13, dtype=torch.int64)}]
    out = fedavg(states, [1, 3])
    assert out["n"].dtype == torch.int64
    assert out["n"].item() == 12
    assert fedavg(states, [3, 1])["n"].item() == 11
    big = [{"n": torch.tensor(2**40, dtype=torch.int64)}] * 2
    assert fedavg(big, [1, 1])["n"].item() == 2**40


def test_float16_keeps_its_dtype():
    states = [{"h": torch.tensor([1.0, 2.0], dtype=torch.float16)}, {"h": torch.tensor([3.0, 4.0], dtype=torch.float16)}]
    out = fedavg(states, [1, 1])
    assert out["h"].dtype == torch.float16
    assert torch.equal(out["h"], torch.tensor([2.0, 3.0], dtype=torch.float16))


def test_inputs_are_not_modified():
    a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    fedavg([a, b], [1, 1])
    assert (a["w"].item(), b["w"].item()) == (1.0, 3.0)


@pytest.mark.parametrize(
    "states, weights, message",
    [
        ([], [], "at least one state"),
        ([{"w": torch.ones(1)}], [1, 2], "one weight per state"),
        ([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [1], "one weight per state"),
        ([{"w": torch.ones(1)}, {"w": torch.ones(1)}], [0, 0], "positive"),
    ],
)
def test_refuses_bad_inputs(states, weights, message):
    with pytest.raises(ValueError, match=message):
        fedavg(states, weights)
