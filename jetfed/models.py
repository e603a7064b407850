"""The model registry: every service builds models by name, so a coordinator and its
workers agree on the architecture without ever shipping code."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from jetfed.errors import UnknownModel

NUM_CLASSES = 10
DEFAULT_MODEL = "mnist-cnn"


class MnistCNN(nn.Module):
    """The reference model of PySyft's asynchronous MNIST demo."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class LogSoftmaxHead(nn.Module):
    """Makes a logits model speak log-probabilities, like the reference, so one loss
    (NLL) and one evaluation path serve every model in the registry."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(x), dim=1)


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=NUM_CLASSES)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return LogSoftmaxHead(net)


def _mobilenet_v3_small() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    net = mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES)
    first = net.features[0][0]
    net.features[0][0] = nn.Conv2d(
        1, first.out_channels, kernel_size=first.kernel_size, stride=first.stride,
        padding=first.padding, bias=False,
    )
    return LogSoftmaxHead(net)


_REGISTRY: Dict[str, Callable[[], nn.Module]] = {
    "mnist-cnn": MnistCNN,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
}


def model_names() -> List[str]:
    return sorted(_REGISTRY)


def build_model(name: str) -> nn.Module:
    """A freshly initialised model; seed torch first for a reproducible start."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownModel(
            f"model: unknown model {name!r}; known models: {', '.join(model_names())}"
        ) from None
    return factory()
