"""Random digit-shaped examples and a seeded mnist-cnn, for tests of the training loop
(the proximal term, SCAFFOLD's correction) that need a real model but no data set."""

from __future__ import annotations

import torch
from torch import nn

from jetfed.models import build_model
from jetfed.tasks.base import TensorExamples

CPU = torch.device("cpu")


def random_digits(count: int = 64, seed: int = 0) -> TensorExamples:
    generator = torch.Generator().manual_seed(seed)
    return TensorExamples(torch.randn(count, 1, 28, 28, generator=generator),
                          torch.randint(0, 10, (count,), generator=generator), CPU)


def fresh_cnn(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mnist-cnn")
