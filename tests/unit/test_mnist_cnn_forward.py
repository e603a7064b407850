"""mnist-cnn pools before its ReLUs (in place) for speed: the outputs and every
gradient must equal the reference's max_pool(relu(conv)) bit for bit, ties and
all-negative windows included, or runs would no longer replay."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from jetfed.models import MnistCNN


def reference_forward(model: MnistCNN, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(model.conv1(x)), 2, 2)
    x = F.max_pool2d(F.relu(model.conv2(x)), 2, 2)
    x = F.relu(model.fc1(x.flatten(1)))
    return F.log_softmax(model.fc2(x), dim=1)


def outputs_and_gradients(model: MnistCNN, forward, x: torch.Tensor, labels: torch.Tensor):
    model.zero_grad()
    output = forward(x)
    F.nll_loss(output, labels).backward()
    return output.detach(), [p.grad.clone() for p in model.parameters()]


def test_same_outputs_and_gradients_as_the_reference_bit_for_bit() -> None:
    torch.manual_seed(3)
    model = MnistCNN()
    x = torch.randn(64, 1, 28, 28)
    x[:8] = 0.0  # zero inputs: conv outputs equal the bias over whole windows (ties)
    labels = torch.randint(0, 10, (64,))
    with torch.no_grad():
        model.conv1.bias[:5] = -10.0  # channels whose every window is negative
    ours = outputs_and_gradients(model, model, x, labels)
    theirs = outputs_and_gradients(model, lambda batch: reference_forward(model, batch), x, labels)
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))
