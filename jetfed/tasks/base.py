"""The Task interface: what runs on a board, written by whoever owns the model and the
data. A task says how to build the model, how to load this board's examples, the loss,
the training loop (a default supervised loop most tasks keep) and the evaluation
metrics. Everything else (transport, checks, rounds, aggregation) stays jetfed's.

Code never travels: the coordinator and the boards agree on a task's name, its class
list and the weights' manifest, and a board runs only the task installed on it.

A task is a class; services build it once from `TaskSettings` (the --data-dir,
--model and --option flags) and call it from one torch thread."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig
from jetfed.partitions import Partition

if TYPE_CHECKING:
    from jetfed.scaffold import ControlVariates

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Option:
    """One setting a task reads from `--option NAME=VALUE`: its default (a string, as
    typed on a command line), what it means, and how to read it."""

    default: Optional[str]
    help: str
    parse: Callable[[str], object] = str


class Examples(ABC):
    """A board's examples for one split. `targets` (int64 class indices on the CPU)
    lets partitions, label counts and share lines work without touching the inputs;
    `batches` yields (inputs, targets) on the compute device, one batch per index
    tensor, in the order given: the training loop owns the shuffle, so every task
    replays the same order for the same seed."""

    targets: torch.Tensor
    device: torch.device

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @abstractmethod
    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[Batch]:
        """(inputs, targets) for each index tensor, on `device`."""

    def label_counts(self, num_classes: int) -> List[int]:
        return [int(c) for c in torch.bincount(self.targets, minlength=num_classes)]


class TensorExamples(Examples):
    """Examples held as two tensors on the compute device (inputs, int64 targets): the
    simplest kind, for data sets that fit in memory; a round then never waits for a disk
    or a host-to-device copy."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise InvalidConfig(f"examples: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
        self.inputs = inputs.to(device)
        self.labels = targets.to(device)
        self.targets = targets.cpu()
        self.device = device

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[Batch]:
        for index in indices:
            index = index.to(self.device)
            yield self.inputs[index], self.labels[index]

    def subset(self, keep: torch.Tensor) -> "TensorExamples":
        """The examples at `keep` (indices or a mask), as the same kind of examples."""
        return TensorExamples(self.inputs[keep.to(self.inputs.device)], self.targets[keep], self.device)


@dataclass(frozen=True)
class TaskSettings:
    """What a service's flags tell its task."""

    data_dir: Path
    device: torch.device
    model: Optional[str] = None  # None: the task's default model
    options: Mapping[str, str] = field(default_factory=dict)
    download: bool = True


@dataclass(frozen=True)
class TrainOutcome:
    state: Dict[str, torch.Tensor]
    num_examples: int
    mean_loss: float
    seconds: float
    # SCAFFOLD: this worker's next control variate c_i, from a loop given `controls`
    # (jetfed.training.train_round); None otherwise, and the worker then keeps none.
    client_control: Optional[Dict[str, torch.Tensor]] = None
    # DP-SGD: whether the loop trained with it (jetfed.training.train_round does when
    # config.noise_multiplier > 0). A worker asked for DP releases no result of a loop
    # that says False: a custom loop that predates DP would train in the clear.
    private: bool = False


@dataclass(frozen=True)
class Evaluation:
    """A model's score on one board's examples. `metrics` is what the run records and
    shows (loss and accuracy at least, for a classification task); the counts serve the
    reference's console lines and stay empty for tasks that do not classify."""

    loss: float
    metrics: Dict[str, float]
    correct: int = 0
    total: int = 0
    predicted_counts: List[int] = field(default_factory=list)
    confusion: List[int] = field(default_factory=list)
    num_classes: int = 0
    seconds: float = 0.0


class Task(ABC):
    """Subclass this, set `name`, and implement `build_model` and `load`; override
    `loss`, `train` or `evaluate` only when the defaults (a supervised loop with the
    round's optimizer, NLL over log-probabilities, classification metrics) do not fit.

    `classes` names the classes in index order: boards are matched by these names, so
    a board that lacks a class still trains, and a fleet whose lists differ is refused
    at connect time. A task that does not classify leaves it empty."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    default_model: ClassVar[str] = ""

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings
        self.option_values = read_options(self, settings.options)

    # What every task must say.

    @property
    def model_name(self) -> str:
        """The name boards and the coordinator agree on (it goes into every manifest)."""
        return self.settings.model or self.default_model

    @property
    @abstractmethod
    def classes(self) -> List[str]:
        """Class names in index order ([] when the task does not classify)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model; torch is seeded before the call, so equal seeds
        give equal weights on every board."""

    @abstractmethod
    def load(self, split: str, partition: Partition) -> Examples:
        """This board's examples of `split` ("train" on workers, "test" on evaluators),
        kept to `partition`, on `settings.device`."""

    @abstractmethod
    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A batch of zeros shaped like the model's input, for export and checks."""

    # What most tasks keep.

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The model's output as log-probabilities, like the reference: NLL."""
        return F.nll_loss(output, target)

    def train(
        self, model: nn.Module, data: Examples, config: TrainConfig, seed: int,
        stop: Optional[threading.Event] = None, controls: Optional["ControlVariates"] = None,
        private_seed: Optional[int] = None,
    ) -> TrainOutcome:
        """One round of local training; see jetfed.training.train_round.

        `controls` comes with a SCAFFOLD round (config.scaffold): pass it on to
        train_round, which corrects each step and returns the next c_i. A task whose own
        loop has no `controls` parameter still works: its SCAFFOLD rounds train
        uncorrected and the worker keeps no c_i for them (it says so in its log).

        `private_seed` seeds a DP-SGD round's sampling and noise (simulation only; a
        board leaves it None: the operating system's entropy, see jetfed.privacy)."""
        from jetfed.training import train_round

        return train_round(model, data, config, seed, stop, loss=self.loss, controls=controls,
                           private_seed=private_seed)

    def evaluate(self, model: nn.Module, data: Examples, batch_size: int, limit: Optional[int] = None) -> Evaluation:
        """Loss, accuracy and per-class recall; see jetfed.training.evaluate."""
        from jetfed.training import evaluate

        return evaluate(model, data, batch_size, len(self.classes), limit=limit, loss=self.loss,
                        class_names=self.classes)

    def describe(self, split: str, data: Examples, who: str) -> str:
        """The line a service prints once its data has loaded."""
        counts = data.label_counts(len(self.classes)) if self.classes else []
        per_class = ", ".join(f"{name}: {count}" for name, count in zip(self.classes, counts))
        return f"{self.name} {split} set on {who}: {per_class + ', ' if per_class else ''}total {len(data)}"


def read_options(task: Task, given: Mapping[str, str]) -> Dict[str, object]:
    """The task's options with defaults filled in and each value read; an unknown or
    unreadable one names the task, the option and what it accepts."""
    unknown = sorted(set(given) - set(task.options))
    if unknown:
        known = ", ".join(sorted(task.options)) or "none"
        raise InvalidConfig(f"--option: task {task.name} has no option {', '.join(unknown)}; its options: {known}")
    values: Dict[str, object] = {}
    for key, option in task.options.items():
        text = given.get(key, option.default)
        if text is None:
            values[key] = None
            continue
        try:
            values[key] = option.parse(text)
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(f"--option {key}={text}: {exc} ({option.help})") from None
    return values


def parse_option_flags(flags: Iterable[str]) -> Dict[str, str]:
    """`--option NAME=VALUE` flags as a mapping; the last of a repeated name wins."""
    options: Dict[str, str] = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep or not key.strip():
            raise InvalidConfig(f"--option {flag!r}: write NAME=VALUE, e.g. --option image_size=64")
        options[key.strip()] = value.strip()
    return options
