"""jetfed.optimizers against torch.optim: the same gradients give the same bits, and a
round of the built-in loop never imports torch._dynamo (the reason they exist)."""

from __future__ import annotations

import subprocess
import sys
from typing import Callable, List

import pytest
import torch
from torch import nn

from jetfed.optimizers import SGD, Adam

Make = Callable[[List[torch.Tensor]], object]


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    net[3].bias.requires_grad_(False)  # a frozen parameter: no gradient, left alone by both
    return net


def trained(make: Make, steps: int = 6) -> List[torch.Tensor]:
    net = model()
    params = list(net.parameters())
    optimizer = make(params)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()  # type: ignore[attr-defined]
        inputs = torch.randn(5, 1, 8, 8, generator=data)
        loss = net(inputs).logsumexp(1).mean() + 1e-3 * sum((p ** 2).sum() for p in params)
        loss.backward()
        optimizer.step()  # type: ignore[attr-defined]
    return [t.detach().clone() for t in net.state_dict().values()]


@pytest.mark.parametrize("ours, theirs", [
    (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda p: SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (lambda p: Adam(p, lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
    (lambda p: Adam(p, lr=0.3), lambda p: torch.optim.Adam(p, lr=0.3)),
], ids=["sgd", "sgd-momentum", "adam", "adam-large-lr"])
def test_each_step_equals_torch_optims_bit_for_bit(ours: Make, theirs: Make) -> None:
    expected, got = trained(theirs), trained(ours)
    untouched = [t.detach().clone() for t in model().state_dict().values()]
    assert len(expected) == len(got)
    for want, have in zip(expected, got):
        assert torch.equal(want, have)
    # The steps moved the trained weights and left the frozen bias as it was.
    assert not torch.equal(got[0], untouched[0])
    assert torch.equal(got[-1], untouched[-1])


def test_zero_grad_leaves_no_gradient() -> None:
    net = model()
    optimizer = SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_a_round_of_the_built_in_loop_never_imports_torch_dynamo() -> None:
    """torch.optim's first step imports torch._dynamo (2.6 s, 150 MB on this machine);
    a fresh interpreter trains an mnist-cnn round with SGD and one with Adam without it."""
    script = """
import sys, torch
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.tasks.base import TensorExamples
from jetfed.training import train_round
data = TensorExamples(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)), torch.device("cpu"))
for optimizer in ("sgd", "adam"):
    outcome = train_round(build_model("mnist-cnn"), data, TrainConfig(batch_size=16, optimizer=optimizer), seed=1)
    assert outcome.num_examples == 64, outcome.num_examples
print("torch._dynamo" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "a training round imported torch._dynamo"
