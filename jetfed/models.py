"""The model registry: every board builds models by name, so boards agree on the
architecture without ever shipping code. Besides jetfed's own models, any
classification model of torchvision's zoo is built by its name, for the task's class
count; each gets a log-softmax head, so one loss (NLL) and one evaluation serve all."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from jetfed.errors import InvalidConfig, UnknownModel

NUM_CLASSES = 10
DEFAULT_MODEL = "mnist-cnn"
MIN_CNN_IMAGE_SIZE = 16


def _cnn_side(image_size: int) -> int:
    """The side of mnist-cnn's last feature map: two 5x5 convolutions, each pooled by 2."""
    return ((image_size - 4) // 2 - 4) // 2


class MnistCNN(nn.Module):
    """The reference model of PySyft's asynchronous MNIST demo; other image sizes,
    channels and class counts change only its input and output layers."""

    def __init__(self, num_classes: int = NUM_CLASSES, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < MIN_CNN_IMAGE_SIZE:
            raise InvalidConfig(f"model mnist-cnn: images of {image_size}px are too small; it needs at least "
                                f"{MIN_CNN_IMAGE_SIZE}px (set image_size)")
        side = _cnn_side(image_size)
        self.conv1 = nn.Conv2d(channels, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(side * side * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference's max_pool(relu(conv)) computed as relu(max_pool(conv)): the same
        # values and the same gradients, bit for bit (ReLU is monotone and keeps the
        # pool's winner; where it is <= 0 both give 0 and a zero gradient), with ReLU on
        # a quarter of the elements and in place (no 23 MB copy per batch of 500). An
        # in-process evaluation of the 10,000 test images (glibc defaults, as `jetfed
        # simulate` runs): 2.2-2.3 -> 1.2-1.6 CPU-s at one thread; training unchanged.
        x = F.relu(F.max_pool2d(self.conv1(x), 2, 2), inplace=True)
        x = F.relu(F.max_pool2d(self.conv2(x), 2, 2), inplace=True)
        # Not in place: fc1's output is a module's, which DP-SGD's backward hooks wrap
        # in a view that must not be modified (a pool's output is no module's).
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


def _first_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """`conv` rebuilt for `channels` input channels (same kernel, stride and padding)."""
    # torch types a conv's kernel_size, stride and padding as any-length tuples; a Conv2d's are pairs
    return nn.Conv2d(channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                     padding=conv.padding, bias=conv.bias is not None)  # type: ignore[arg-type]


def _resnet18(num_classes: int, channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = _first_conv(net.conv1, channels)
    return LogSoftmaxHead(net)


def _mobilenet_v3_small(num_classes: int, channels: int, image_size: int) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    net = mobilenet_v3_small(weights=None, num_classes=num_classes)
    net.features[0][0] = _first_conv(net.features[0][0], channels)
    return LogSoftmaxHead(net)


Factory = Callable[[int, int, int], nn.Module]
_REGISTRY: Dict[str, Factory] = {
    "mnist-cnn": MnistCNN,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
}


def model_names() -> List[str]:
    """jetfed's own models; torchvision's classification zoo comes on top (zoo_names)."""
    return sorted(_REGISTRY)


def zoo_names() -> List[str]:
    """torchvision's classification models, by the names its builders take."""
    import torchvision.models

    if hasattr(torchvision.models, "list_models"):
        return sorted(torchvision.models.list_models(module=torchvision.models))
    return []  # torchvision < 0.14: ask for a model by its builder's name all the same


def build_model(name: str, num_classes: int = NUM_CLASSES, channels: int = 1, image_size: int = 28) -> nn.Module:
    """A freshly initialised model; seed torch first for a reproducible start.

    jetfed's models adapt their first layer to `channels`; torchvision's others take
    three-channel images (a grayscale folder is read as RGB with channels=3)."""
    factory = _REGISTRY.get(name)
    if factory is not None:
        return factory(num_classes, channels, image_size)
    builder = _zoo_builder(name)
    if channels != 3:
        raise InvalidConfig(f"model {name}: torchvision's models take 3-channel images, not {channels}; set "
                            f"channels=3, or use one of jetfed's models ({', '.join(model_names())})")
    return LogSoftmaxHead(builder(weights=None, num_classes=num_classes))


def _zoo_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models

    builder = getattr(torchvision.models, name, None) if not name.startswith("_") else None
    zoo = zoo_names()
    if builder is None or not callable(builder) or (zoo and name not in zoo):
        raise UnknownModel(
            f"model: unknown model {name!r}; jetfed's models: {', '.join(model_names())}; or any classification "
            f"model of torchvision's zoo (e.g. resnet50, efficientnet_b0, mobilenet_v2)"
        )
    return builder
