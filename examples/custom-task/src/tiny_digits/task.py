"""tiny-digits: a complete jetfed task with its own model and its own data loader.

MNIST's IDX files, read by this package itself, shrunk to 14x14 and fed to a two-layer
MLP. Everything jetfed needs is here; the training loop, the metrics, the transport and
the aggregation are jetfed's."""

import gzip
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from jetfed.tasks import Option, Task, TensorExamples

FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}


def read_idx(path: Path) -> torch.Tensor:
    """MNIST's container: two zero bytes, a type byte, the number of dimensions, then
    each dimension as a big-endian uint32, then the bytes."""
    raw = gzip.open(path).read()
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    return torch.frombuffer(bytearray(raw[4 + 4 * len(dims):]), dtype=torch.uint8).reshape(dims)


class TinyDigits(Task):
    name = "tiny-digits"
    description = "MNIST at 14x14 through a small MLP (jetfed's custom-task example)"
    default_model = "tiny-mlp"
    options = {"hidden": Option("64", "hidden units of the MLP", int)}
    classes = [str(digit) for digit in range(10)]

    def build_model(self) -> nn.Module:
        hidden = self.option_values["hidden"]
        return nn.Sequential(nn.Flatten(), nn.Linear(14 * 14, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10), nn.LogSoftmax(dim=1))

    def load(self, split, partition):
        folder = self.settings.data_dir
        images = read_idx(folder / FILES[split].format("images", 3))
        labels = read_idx(folder / FILES[split].format("labels", 1)).long()
        keep = partition.indices(labels, len(self.classes))
        inputs = F.avg_pool2d(images[keep].float().div(255).unsqueeze(1), 2)  # 28x28 -> 14x14
        return TensorExamples(inputs, labels[keep], self.settings.device)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, 1, 14, 14)
