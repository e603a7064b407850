"""The whole federation over real processes: three workers and an evaluator as
`jetfed` subprocesses, the coordinator in-process and as its own CLI."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import List

import pytest
from safetensors.torch import load_file

from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from jetfed.models import build_model
from tests.conftest import free_port
from tests.integration.processes import HOST, Fleet, jetfed_command

ROUNDS = 5
NAMES = ["alice", "bob", "charlie"]
SHARES = r"Percentage numbers 0-3: \d+%, 4-6: \d+%, 7-9: \d+%"
SCORE = r"Average loss: \d+\.\d{4}, Accuracy: \d+/200 \(\d+\.\d{2}%\)"


def round_layout(number: int) -> List[str]:
    """The reference's console lines for one evaluated round, as regexes."""
    lines = [rf"Training round {number}/{ROUNDS}", "Evaluating models"]
    for who in [f"Model update {name}" for name in NAMES] + ["Federated model"]:
        lines += [f"{who}: {SHARES}", f"{who}: {SCORE}"]
    return lines


@pytest.fixture(scope="module")
def federation(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One five-round run, shared by the assertions below."""
    settings = RunSettings(
        workers={name: fleet.workers[name].address for name in NAMES},
        evaluator=fleet.evaluator.address,
        out_dir=tmp_path_factory.mktemp("run"),
        rounds=ROUNDS,
        eval_every=1,
        train=TrainConfig(lr=0.1, batch_size=32, max_batches=10, seed=1),
        round_timeout=60.0,
        eval_timeout=60.0,
        connect_timeout=30.0,
    ).validated()
    lines: List[str] = []
    summary = asyncio.run(run(settings, say=lines.append))
    records = [json.loads(line) for line in (settings.out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, lines, records


def test_global_accuracy_rises(federation: tuple) -> None:
    summary, _, records = federation
    accuracy = [r["evaluation"]["global"]["accuracy"] for r in records]
    assert accuracy[-1] > 0.3, accuracy
    assert accuracy[-1] >= accuracy[0] + 0.1, accuracy
    assert summary.final_score is not None
    assert summary.final_score.accuracy == accuracy[-1]


def test_metrics_has_one_line_per_round(federation: tuple) -> None:
    _, _, records = federation
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    for record in records:
        assert record["duration_s"] > 0
        assert record["workers"] == NAMES
        assert record["failed"] == {} and record["attempts"] == 1
        assert sorted(record["evaluation"]) == sorted(["global", *NAMES])
        for score in record["evaluation"].values():
            assert {"accuracy", "loss", "correct", "total"} <= set(score)
            assert score["total"] == 200
            assert score["accuracy"] == pytest.approx(score["correct"] / 200)


def test_model_file_holds_the_mnist_cnn(federation: tuple) -> None:
    summary, _, _ = federation
    tensors = load_file(str(summary.model_path))
    expected = build_model("mnist-cnn").state_dict()
    assert sorted(tensors) == sorted(expected)
    assert all(tensors[name].shape == expected[name].shape for name in expected)


def test_printed_lines_follow_the_reference_layout(federation: tuple) -> None:
    """Three lines about the fleet (whom it awaits, that it is ready, what it runs and
    where the first weights came from), then the reference's layout, round by round."""
    _, lines, _ = federation
    expected = [
        r"Waiting up to 30s for 3 workers: alice at [\d.:]+, bob at [\d.:]+, charlie at [\d.:]+; evaluator at [\d.:]+",
        r"Fleet ready after \d+\.\d\ds: 3 of 3 workers and the evaluator",
        r"Running task mnist, model mnist-cnn \(10 classes, digest [0-9a-f]{12}\); initial weights: worker alice, "
        r"seed 1",
    ]
    expected += [pattern for number in range(1, ROUNDS + 1) for pattern in round_layout(number)]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), (pattern, line)


def coordinator(fleet: Fleet, out: Path, workers: dict, *extra: str) -> subprocess.CompletedProcess:
    args = ["coordinator", "--evaluator", f"testing={fleet.evaluator.address}", "--out", str(out), *extra]
    args += [f"--worker={name}={address}" for name, address in workers.items()]
    return subprocess.run(jetfed_command(*args), capture_output=True, text=True, timeout=120)


def test_coordinator_cli_runs_against_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    workers = {name: fleet.workers[name].address for name in NAMES}
    done = coordinator(fleet, tmp_path, workers, "--rounds", "2", "--batches", "3", "--connect-timeout", "30")
    assert done.returncode == 0, done.stderr
    assert "Training round 2/2" in done.stdout
    assert re.search(rf"Federated model: {SCORE}", done.stdout), done.stdout
    assert "Run finished: 2 rounds" in done.stdout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "model.safetensors").is_file()


def test_coordinator_cli_names_an_unreachable_worker(fleet: Fleet, tmp_path: Path) -> None:
    """Two workers make a quorum of two, so bob's closed port ends the run at start."""
    workers = {"alice": fleet.workers["alice"].address, "bob": f"{HOST}:{free_port()}"}
    done = coordinator(fleet, tmp_path, workers, "--rounds", "1", "--connect-timeout", "2")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and re.search(r"only 1 of the 2 workers answered .*\bbob at [\d.:]+: never answered: UNAVAILABLE", errors[0]), done.stderr
    assert "alice:" not in errors[0]
    assert not (tmp_path / "model.safetensors").exists()
