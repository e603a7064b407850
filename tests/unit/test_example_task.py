"""examples/custom-task's code as the README shows it: the task and the custom loop run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from jetfed.config import TrainConfig
from jetfed.errors import TrainingStopped
from jetfed.partitions import Partition
from jetfed.tasks import TaskSettings, build_task

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "custom-task" / "src"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True)
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SOURCE))


def settings(data: Path) -> TaskSettings:
    return TaskSettings(data_dir=data, device=torch.device("cpu"), options={"hidden": "16"})


def test_the_readme_shows_the_example_code_as_it_is() -> None:
    readme = README.read_text()
    for name in ("task.py", "proximal.py"):
        code = (SOURCE / "tiny_digits" / name).read_text()
        body = code[code.index("class "):]
        assert body.strip() in readme, f"README's copy of {name} differs from the file"


def test_the_task_trains_and_scores(tiny_mnist: Path) -> None:
    task = build_task("tiny_digits.task:TinyDigits", settings(tiny_mnist))
    data = task.load("train", Partition(labels=frozenset({0, 1, 2, 3})))
    assert set(data.targets.tolist()) == {0, 1, 2, 3}
    model = task.build_model()
    outcome = task.train(model, data, TrainConfig(max_batches=3), seed=1)
    assert outcome.num_examples == 96
    assert task.evaluate(model, task.load("test", Partition()), 100).metrics["accuracy"] >= 0


def test_the_custom_loop_trains_stays_near_the_start_and_stops(tiny_mnist: Path) -> None:
    plain = build_task("tiny_digits.task:TinyDigits", settings(tiny_mnist))
    prox = build_task("tiny_digits.proximal:ProximalDigits", TaskSettings(
        data_dir=tiny_mnist, device=torch.device("cpu"), options={"hidden": "16", "mu": "5"}))
    data = plain.load("train", Partition())
    torch.manual_seed(0)
    start = plain.build_model().state_dict()

    def drift(task) -> float:
        model = plain.build_model()
        model.load_state_dict(start)
        outcome = task.train(model, data, TrainConfig(max_batches=5, lr=0.1), seed=2)
        assert outcome.num_examples == 160
        return sum(float(((outcome.state[k] - start[k]) ** 2).sum()) for k in start)

    assert drift(prox) < drift(plain)
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingStopped):
        prox.train(plain.build_model(), data, TrainConfig(), seed=1, stop=stop)
