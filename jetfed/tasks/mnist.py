"""The mnist task: the reference of PySyft's asynchronous federated MNIST demo, and
jetfed's default. Its examples live in memory on the compute device (60,000 images of
28x28 are 188 MB as floats), so a round never waits for a disk."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from jetfed.data import format_counts, load_mnist
from jetfed.models import build_model
from jetfed.partitions import Partition
from jetfed.tasks.base import Examples, Task
from jetfed.training import DeviceData

CLASSES = [str(digit) for digit in range(10)]


class MnistTask(Task):
    name = "mnist"
    description = "handwritten digits from MNIST's IDX files in --data-dir (the reference run)"
    default_model = "mnist-cnn"

    @property
    def classes(self) -> List[str]:
        return CLASSES

    def build_model(self) -> nn.Module:
        return build_model(self.model_name, num_classes=len(CLASSES), channels=1, image_size=28)

    def load(self, split: str, partition: Partition) -> Examples:
        keep = None if partition.is_everything() else lambda labels: partition.indices(labels, len(CLASSES))
        images = load_mnist(self.settings.data_dir, split, download=self.settings.download, keep=keep)
        return DeviceData.from_images(images, self.settings.device)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, 1, 28, 28)

    def describe(self, split: str, data: Examples, who: str) -> str:
        return f"MNIST {split} set on {who}: {format_counts(data.label_counts(len(CLASSES)))}"
