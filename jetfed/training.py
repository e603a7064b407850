"""One round of local training and one pass of evaluation, written to read like
pytorch/examples' mnist: the device is chosen once and the data already lives there."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.data import LabeledImages
from jetfed.errors import TrainingStopped

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class DeviceData:
    """Normalised inputs (N, 1, 28, 28) and labels, resident on the compute device so a
    round never pays for host-to-device copies."""

    inputs: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_images(cls, data: LabeledImages, device: torch.device) -> "DeviceData":
        inputs = (data.images.float().div(255.0).sub(MNIST_MEAN).div(MNIST_STD)).unsqueeze(1)
        return cls(inputs.to(device), data.labels.to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TrainOutcome:
    state: StateDict
    num_examples: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    correct: int
    total: int
    loss: float
    predicted_counts: List[int]
    confusion: List[int]
    num_classes: int
    seconds: float


def derive_seed(seed: int, round_number: int, worker: str) -> int:
    """A seed owned by (run seed, round, worker): rounds replay exactly, workers differ."""
    digest = hashlib.sha256(f"{seed}/{round_number}/{worker}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def train_round(
    model: nn.Module, data: DeviceData, config: TrainConfig, seed: int, stop: Optional[threading.Event] = None,
) -> TrainOutcome:
    """Train `model` in place on shuffled batches; a fresh optimizer every round, as the
    reference did, so no state leaks from one global model to the next.

    `stop` is looked at before every batch: a round nobody waits for any more (its call
    cancelled or past its deadline, the service shutting down) raises TrainingStopped
    at the next batch instead of running its remaining epochs."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(config, model)
    batches = math.ceil(len(data) / config.batch_size)
    if config.max_batches:
        batches = min(batches, config.max_batches)
    model.train()
    loss_sum = torch.zeros((), device=data.labels.device)
    examples = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=order_rng).to(data.labels.device)
        for b in range(batches):
            if stop is not None and stop.is_set():
                raise TrainingStopped(f"training stopped after {examples} examples: nobody awaits the round")
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            inputs, labels = data.inputs[index], data.labels[index]
            optimizer.zero_grad()
            loss = F.nll_loss(model(inputs), labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            examples += len(index)
    mean_loss = float(loss_sum) / max(examples, 1)
    return TrainOutcome(model.state_dict(), examples, mean_loss, time.perf_counter() - started)


def evaluate(
    model: nn.Module, data: DeviceData, batch_size: int, num_classes: int, limit: Optional[int] = None
) -> Evaluation:
    """Score the first `limit` examples (all by default)."""
    started = time.perf_counter()
    total = len(data) if limit is None else min(limit, len(data))
    model.eval()
    device = data.labels.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            inputs, labels = data.inputs[start:stop], data.labels[start:stop]
            output = model(inputs)
            loss_sum += F.nll_loss(output, labels, reduction="sum").double()
            predicted = output.argmax(dim=1)
            confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    matrix = confusion.view(num_classes, num_classes).cpu()
    return Evaluation(
        correct=int(matrix.diagonal().sum()),
        total=total,
        loss=float(loss_sum) / max(total, 1),
        predicted_counts=[int(c) for c in matrix.sum(dim=0)],
        confusion=[int(c) for c in matrix.flatten()],
        num_classes=num_classes,
        seconds=time.perf_counter() - started,
    )
