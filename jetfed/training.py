"""One round of local training and one pass of evaluation over any task's examples,
written to read like pytorch/examples' mnist. The loop owns the shuffle (a seeded
permutation per epoch), so a task whose examples live in memory and one that reads
them from disk see the same batches in the same order for the same seed."""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Union, cast

import torch
from torch import nn
from torch.nn import functional as F

from jetfed.config import TrainConfig
from jetfed.data import LabeledImages
from jetfed.errors import InvalidConfig, TrainingStopped
from jetfed.optimizers import SGD, Adam
from jetfed.scaffold import ControlVariates, Correction, control_names, next_client_control
from jetfed.tasks.base import Batch, Evaluation, Examples, TensorExamples, TrainOutcome

if TYPE_CHECKING:
    from jetfed.privacy import PrivateGradients

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DeviceData(TensorExamples):
    """MNIST's images and labels, resident on the compute device so a round never pays
    for host-to-device copies: the mnist task's examples. The images stay uint8 (N, 28,
    28), a quarter of their float size (alice's 24,754: 19 MB, not 78), and each batch
    is normalised as it is drawn, with the same operations on the same values as a
    whole-set normalisation, so the bits a model sees are the same."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise InvalidConfig(f"examples: MNIST images must be uint8 (N, H, W), not {images.dtype} "
                                f"{tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise InvalidConfig(f"examples: {images.shape[0]} inputs but {labels.shape[0]} targets")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.targets = labels.cpu()
        self.device = device

    @classmethod
    def from_images(cls, data: LabeledImages, device: torch.device) -> "DeviceData":
        return cls(data.images, data.labels, device)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) -> the model's float (N, 1, H, W) inputs, in place after the
        one float copy."""
        return images.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)

    @property
    def inputs(self) -> torch.Tensor:  # type: ignore[override]
        """Every example normalised at once (a float copy of the whole set): for tools
        and tests; training and evaluation normalise batch by batch."""
        return self.normalize(self.images)

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[Batch]:
        for index in indices:
            index = index.to(self.device)
            yield self.normalize(self.images[index]), self.labels[index]

    def subset(self, keep: torch.Tensor) -> "DeviceData":
        return DeviceData(self.images[keep.to(self.images.device)], self.targets[keep], self.device)


def derive_seed(seed: int, round_number: int, worker: str) -> int:
    """A seed owned by (run seed, round, worker): rounds replay exactly, workers differ."""
    digest = hashlib.sha256(f"{seed}/{round_number}/{worker}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_optimizer(config: TrainConfig, model: nn.Module) -> Union[SGD, Adam]:
    """The round's optimizer over `model`'s parameters: jetfed.optimizers' SGD or Adam,
    torch.optim's arithmetic without its start-up cost (that module says why)."""
    if config.optimizer == "adam":
        return Adam(model.parameters(), lr=config.lr)
    return SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


class ProximalTerm:
    """FedProx's mu/2 * sum ||w - w0||^2 over a model's trained parameters, w0 being
    their values when the term was made: at the start of a round, the global model just
    loaded. Its gradient, mu * (w - w0), pulls each step back toward that model.
    Buffers (batch-norm statistics) are not trained, so they take no part."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self._mu = mu
        self._pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def __call__(self) -> torch.Tensor:
        drift = cast(torch.Tensor, sum(((p - start) ** 2).sum() for p, start in self._pairs))  # a trained model has parameters
        return self._mu / 2 * drift


def train_round(
    model: nn.Module, data: Examples, config: TrainConfig, seed: int, stop: Optional[threading.Event] = None,
    loss: Loss = F.nll_loss, controls: Optional[ControlVariates] = None, private_seed: Optional[int] = None,
) -> TrainOutcome:
    """Train `model` in place on shuffled batches; a fresh optimizer every round, as the
    reference did, so no state leaks from one global model to the next.

    `stop` is looked at before every batch: a round nobody waits for any more (its call
    cancelled or past its deadline, the service shutting down) raises TrainingStopped
    at the next batch instead of running its remaining epochs.

    With `config.proximal_mu` > 0 each batch's backward pass also takes FedProx's
    proximal term (ProximalTerm); the mean loss reported stays the task's loss, so
    rounds with and without the term compare. At 0 the loop runs no extra op.

    With `controls` (SCAFFOLD: the server's c and this worker's c_i) each batch's loss
    also takes the Correction, whose gradient is c - c_i; the optimizer steps K are
    counted, and the outcome carries this worker's next c_i (jetfed.scaffold's
    next_client_control from the model as loaded and as trained). Without, none of
    it runs and `client_control` is None.

    With `config.noise_multiplier` > 0 the round is DP-SGD (jetfed.privacy): as many
    steps as the plain loop takes, each over a Poisson sample of the examples drawn
    from a generator seeded by `private_seed` (None: the operating system's entropy),
    each example's gradient of the task's loss clipped, the sum noised; the proximal
    term and SCAFFOLD's correction, which read no example, add to that gradient as
    they are. The outcome claims the examples the plain loop would (the Poisson
    batches' expected total), so screening's bound holds."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(config, model)
    proximal = ProximalTerm(model, config.proximal_mu) if config.proximal_mu > 0 else None
    correction = Correction(model, controls) if controls is not None else None
    start = _floating_copy(model) if controls is not None else {}
    batches = math.ceil(len(data) / config.batch_size)
    if config.max_batches:
        batches = min(batches, config.max_batches)
    model.train()
    loss_sum = torch.zeros((), device=data.device)
    examples = steps = 0
    dp = None
    if config.private:
        from jetfed import privacy

        generator = privacy.private_generator(private_seed)
        dp = privacy.PrivateGradients(model, config, len(data), generator)
    try:
        for _ in range(config.epochs):
            if dp is None:
                order = torch.randperm(len(data), generator=order_rng)
                slices: Iterator[torch.Tensor] = (order[b * config.batch_size:(b + 1) * config.batch_size] for b in range(batches))
            else:
                slices = privacy.poisson_batches(len(data), privacy.sample_rate(config, len(data)), batches, generator)
            for inputs, labels in data.batches(slices):
                if stop is not None and stop.is_set():
                    raise TrainingStopped(f"training stopped after {examples} examples: nobody awaits the round")
                optimizer.zero_grad()
                if dp is None:
                    batch_loss = loss(model(inputs), labels)
                    objective = batch_loss if proximal is None else batch_loss + proximal()
                    if correction is not None:
                        objective = objective + correction()
                    objective.backward()
                else:
                    batch_loss = _private_step(dp, loss, inputs, labels, proximal, correction)
                optimizer.step()
                steps += 1
                loss_sum += batch_loss.detach() * len(labels)
                examples += len(labels)
    finally:
        if dp is not None:
            dp.close()
    mean_loss = float(loss_sum) / max(examples, 1)
    if dp is not None:
        examples = config.examples_per_round(len(data))
    state = model.state_dict()
    client_control = None
    if controls is not None:
        client_control = next_client_control(controls, start, state, steps, config.lr)
    return TrainOutcome(state, examples, mean_loss, time.perf_counter() - started, client_control,
                        private=dp is not None)


def _private_step(
    dp: "PrivateGradients", loss: Loss, inputs: torch.Tensor, labels: torch.Tensor,
    proximal: Optional[ProximalTerm], correction: Optional[Correction],
) -> torch.Tensor:
    """One DP-SGD step's gradients in place: the clipped, noised gradient of the task's
    loss, then those of the terms that read no example. An empty Poisson sample runs no
    forward pass: its gradient is the noise alone. The batch's loss, for the record."""
    if len(labels):
        batch_loss = loss(dp.forward(inputs), labels)
        batch_loss.backward()
    else:
        batch_loss = torch.zeros((), device=labels.device)
    dp.privatize(len(labels))
    extra = None
    if proximal is not None:
        extra = proximal()
    if correction is not None:
        extra = correction() if extra is None else extra + correction()
    if extra is not None:
        extra.backward()
    return batch_loss


def _floating_copy(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's floating tensors as loaded, before any step: SCAFFOLD's x."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in control_names(state)}


def evaluate(
    model: nn.Module, data: Examples, batch_size: int, num_classes: int, limit: Optional[int] = None,
    loss: Loss = F.nll_loss, class_names: Optional[List[str]] = None,
) -> Evaluation:
    """Score the first `limit` examples (all by default): the mean loss, accuracy and
    each class's recall (named by `class_names`, else by index), with the confusion
    matrix and predicted counts the reference's console lines are drawn from."""
    started = time.perf_counter()
    total = len(data) if limit is None else min(limit, len(data))
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=data.device)
    slices = (torch.arange(start, min(start + batch_size, total)) for start in range(0, total, batch_size))
    with torch.no_grad(), _channels_last(model, data.device) as image_batch:
        for inputs, labels in data.batches(slices):
            output = model(image_batch(inputs))
            loss_sum += loss(output, labels).double() * len(labels)
            predicted = output.argmax(dim=1)
            confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    matrix = confusion.view(num_classes, num_classes).cpu()
    correct = int(matrix.diagonal().sum())
    mean_loss = float(loss_sum) / max(total, 1)
    return Evaluation(
        loss=mean_loss,
        metrics=classification_metrics(matrix, mean_loss, class_names),
        correct=correct,
        total=total,
        predicted_counts=[int(c) for c in matrix.sum(dim=0)],
        confusion=[int(c) for c in matrix.flatten()],
        num_classes=num_classes,
        seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def _channels_last(model: nn.Module, device: torch.device) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """On a CPU, score image batches (N, C, H, W) in channels-last layout, whose oneDNN
    convolutions run mnist-cnn's forward pass twice as fast at one thread (10,000 test
    images: 2.8 s -> 1.35 s), and the evaluator scores 20 models in the reference run
    beside the workers' training. The model goes back to its own layout afterwards, so
    training (and its bits) never sees the change; scores may differ from the plain
    layout's in the last bits of the loss."""
    if device.type != "cpu":
        yield lambda batch: batch
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield lambda batch: batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    finally:
        model.to(memory_format=torch.contiguous_format)


def classification_metrics(matrix: torch.Tensor, loss: float, class_names: Optional[List[str]] = None) -> Dict[str, float]:
    """loss, accuracy, and recall/<class> for each class the examples hold (a class
    with no examples has no recall: it is left out rather than reported as 0)."""
    total = int(matrix.sum())
    metrics = {"loss": loss, "accuracy": float(matrix.diagonal().sum()) / max(total, 1)}
    names = class_names or [str(i) for i in range(matrix.shape[0])]
    for index, name in enumerate(names):
        held = int(matrix[index].sum())
        if held:
            metrics[f"recall/{name}"] = float(matrix[index, index]) / held
    return metrics
