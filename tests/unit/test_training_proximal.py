"""FedProx's proximal term in train_round: absent at mu 0, mu * (w - w0) in the
gradient otherwise, and never in the loss a round reports."""

from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from jetfed.config import TrainConfig
from jetfed.tasks.base import TensorExamples
from jetfed.training import ProximalTerm, make_optimizer, train_round
from tests.unit.tiny_training import CPU, fresh_cnn, random_digits


def plain_loop(model: nn.Module, data: TensorExamples, config: TrainConfig, seed: int) -> Dict[str, torch.Tensor]:
    """train_round as it was before the proximal term, written out as pytorch/examples
    would: same seeding, same per-epoch permutation, same optimizer."""
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(config, model)
    batches = min(math.ceil(len(data) / config.batch_size), config.max_batches or len(data))
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=order_rng)
        for b in range(batches):
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            optimizer.zero_grad()
            F.nll_loss(model(data.inputs[index]), data.labels[index]).backward()
            optimizer.step()
    return model.state_dict()


def squared_drift(state: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor]) -> float:
    return sum(float(((state[k].double() - start[k].double()) ** 2).sum()) for k in start)


@pytest.mark.parametrize("config", [
    TrainConfig(batch_size=8, max_batches=4, epochs=2, seed=5),
    TrainConfig(lr=0.05, momentum=0.5, batch_size=16, max_batches=0, seed=5),
    TrainConfig(optimizer="adam", lr=1e-3, batch_size=8, max_batches=3, seed=5),
])
def test_mu_zero_trains_bit_for_bit_as_the_plain_loop(config: TrainConfig) -> None:
    data = random_digits()
    expected = plain_loop(fresh_cnn(), data, config, seed=11)
    outcome = train_round(fresh_cnn(), data, config, seed=11)
    assert outcome.state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(outcome.state[key], tensor), key


def test_a_larger_mu_keeps_the_weights_nearer_the_global_model() -> None:
    data = random_digits(128)
    start = {k: v.clone() for k, v in fresh_cnn().state_dict().items()}
    drifts = []
    for mu in (0.0, 1.0, 5.0):  # SGD with the term is stable while lr * mu < 2
        config = TrainConfig(lr=0.1, batch_size=8, max_batches=0, seed=1, proximal_mu=mu)
        drifts.append(squared_drift(train_round(fresh_cnn(), data, config, seed=4).state, start))
    assert drifts[0] > drifts[1] > drifts[2] > 0
    assert drifts[2] < 0.5 * drifts[0]


def test_the_term_adds_mu_times_the_drift_to_every_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    term = ProximalTerm(model, mu=0.7)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.125]]))
        model.bias.add_(torch.tensor([3.0, -0.5]))
    inputs, targets = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])

    def gradients(with_term: bool) -> list:
        model.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        (loss + term() if with_term else loss).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, proximal = gradients(False), gradients(True)
    for p, p0, g, g_prox in zip(model.parameters(), start, plain, proximal):
        assert torch.allclose(g_prox - g, 0.7 * (p.detach() - p0), atol=1e-6)
    # And the value: mu/2 * the squared drift, 0.35 * (0.25+1+4+0+0.0625+0.015625+9+0.25).
    assert float(term().detach()) == pytest.approx(0.35 * 14.578125)


def test_sgd_steps_follow_the_proximal_recurrence_and_report_the_task_loss() -> None:
    """A linear model from zero on inputs of ones, with loss = the batch's mean output
    sum: every weight's task gradient is 1, so each weight's drift d from the start
    obeys d' = d - lr * (1 + mu * d). lr 0.1, mu 2: d = 0, -0.1, -0.18, -0.244 (plain
    SGD: 0, -0.1, -0.2, -0.3). The task loss at a step is 10 * d (10 weights), so the
    round reports the mean of 0, -1, -1.8, not a loss that includes the term."""
    data = TensorExamples(torch.ones(12, 4), torch.zeros(12, dtype=torch.int64), CPU)

    def run(mu: float):
        model = nn.Linear(4, 2)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        config = TrainConfig(lr=0.1, batch_size=4, max_batches=0, proximal_mu=mu)
        return train_round(model, data, config, seed=0, loss=lambda out, target: out.sum() / len(target))

    proximal, plain = run(2.0), run(0.0)
    for state, drift in ((proximal.state, -0.244), (plain.state, -0.3)):
        for tensor in state.values():
            assert torch.allclose(tensor, torch.full_like(tensor, drift), atol=1e-6)
    assert proximal.mean_loss == pytest.approx(-2.8 / 3, abs=1e-5)
    assert plain.mean_loss == pytest.approx(-1.0, abs=1e-5)
    assert proximal.num_examples == plain.num_examples == 12


def test_frozen_parameters_take_no_part() -> None:
    model = nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    term = ProximalTerm(model, mu=1.0)
    with torch.no_grad():
        model.bias.add_(5.0)
        model.weight.add_(torch.tensor([[1.0, 2.0]]))
    assert float(term().detach()) == pytest.approx(0.5 * (1.0 + 4.0))
