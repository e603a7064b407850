"""What the fleet runs, agreed at connect time. Code never travels, so the coordinator
learns the task, the model and its class list only from each service's GetInfo: every
worker and the evaluator must run this run's task, the same model (name and
architecture, compared by the digest of its tensor spec) and the same classes. A fleet
started with different flags is refused here, before any weights move, with both sides
and the flag that fixes it named; otherwise it would fail every Train on a manifest
(another architecture) or, worse, average models that mean different classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import grpc

from jetfed.errors import JetfedError
from jetfed.v1 import info_pb2

# GetInfo.task is "" from services older than tasks: they ran mnist.
OLDER_TASK = "mnist"
_SHOWN_CLASSES = 12
_SHOWN_DIGEST = 12


class FleetMismatch(JetfedError):
    """A service that runs another task, model, architecture or class list than the run."""

    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class ServiceModel:
    """What one service says it runs; `name` is how messages call it."""

    name: str
    is_evaluator: bool
    task: str
    model: str
    digest: str
    classes: Tuple[str, ...]

    @classmethod
    def of(cls, name: str, info: info_pb2.GetInfoResponse, is_evaluator: bool = False) -> "ServiceModel":
        return cls(name, is_evaluator, info.task or OLDER_TASK, info.model, info.model_digest,
                   tuple(info.class_names))

    @property
    def who(self) -> str:
        return "the evaluator" if self.is_evaluator else f"worker {self.name}"

    @property
    def subject(self) -> str:
        """How a fix addresses it: `start bob with ...`, `start the evaluator with ...`."""
        return "the evaluator" if self.is_evaluator else self.name


@dataclass(frozen=True)
class FleetModel:
    """The run's task and the model the fleet serves for it, as the first worker in the
    configuration's order that answered (`reference`) reports it. `digest` is "" when
    that worker predates model digests: architectures are then compared by each Train's
    manifest only."""

    task: str
    model: str
    digest: str
    classes: Tuple[str, ...]
    reference: str

    def describe(self) -> str:
        """`task mnist, model mnist-cnn (10 classes, digest 3c4d5e6f7a8b)`."""
        details = [f"{len(self.classes)} classes"] if self.classes else []
        if self.digest:
            details.append(f"digest {short(self.digest)}")
        return f"task {self.task}, model {self.model}" + (f" ({', '.join(details)})" if details else "")

    def check(self, service: ServiceModel) -> None:
        """FleetMismatch naming `service` and the reference worker if it differs."""
        if service.task != self.task:
            raise FleetMismatch(_task_problem(service, self.task, self.reference))
        if service.model != self.model:
            raise FleetMismatch(f"{service.who} runs model {service.model!r}, this run and worker {self.reference} "
                                f"run {self.model!r}: start {service.subject} with --model {self.model}")
        if service.classes != self.classes:
            raise FleetMismatch(
                f"{service.who}'s classes {_classes(service.classes)} differ from {self.reference}'s "
                f"{_classes(self.classes)}: give every board the same class list (image-folder: the same "
                "--option classes=...)"
            )
        if service.digest and self.digest and service.digest != self.digest:
            raise FleetMismatch(
                f"{service.who}'s model {service.model} has another architecture (digest {short(service.digest)} vs "
                f"{short(self.digest)}) than {self.reference}'s: the same --model and options (image_size, channels) "
                "on every board"
            )


def agree(task: str, model: Optional[str], workers: Sequence[ServiceModel]) -> FleetModel:
    """The fleet's model: `workers` (those that answered, in the configuration's order)
    must all run `task`, and `model` when given; the first of them that does sets the
    model, the classes and the architecture the others must match."""
    if not workers:
        raise ValueError("agree needs at least one worker")
    for service in workers:
        if service.task != task:
            running = [w.name for w in workers if w.task == task]
            raise FleetMismatch(_task_problem(service, task, running[0] if running else None))
    if model is not None:
        for service in workers:
            if service.model != model:
                others = [w.name for w in workers if w.model == model]
                side = f"this run and worker {others[0]} train" if others else "this run trains"
                raise FleetMismatch(f"{service.who} runs model {service.model!r}, {side} {model!r} (--model): start "
                                    f"{service.subject} with --model {model}, or leave --model out to take the "
                                    "fleet's")
    first = workers[0]
    fleet = FleetModel(task, first.model, first.digest, first.classes, first.name)
    for service in workers[1:]:
        fleet.check(service)
    return fleet


def _task_problem(service: ServiceModel, task: str, running: Optional[str]) -> str:
    """Why `service` does not belong; `running` is a worker that does run `task`."""
    if running is not None:
        return (f"{service.who} runs task {service.task!r}, this run and worker {running} run {task!r}: start "
                f"{service.subject} with --task {task}")
    problem = (f"{service.who} runs task {service.task!r}, this run runs {task!r} (--task): start the boards with "
               f"--task {task}, or give the coordinator --task {service.task}")
    if ":" in task:
        problem += (" (the coordinator takes a task's name, as the boards' GetInfo and `jetfed tasks` report it, "
                    "never package.module:attr: it imports no task)")
    return problem


def short(digest: str) -> str:
    return digest[:_SHOWN_DIGEST]


def _classes(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_CLASSES])
    if len(names) > _SHOWN_CLASSES:
        shown += f", ... ({len(names)} in all)"
    return f"[{shown}]"
