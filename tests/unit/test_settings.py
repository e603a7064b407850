from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig


def settings(**changes):
    base = RunSettings(workers={"alice": "127.0.0.1:50051"}, evaluator=None, out_dir=Path("runs/x"))
    return replace(base, **changes)


def reference_lr(round_number):
    return max(0.1 * 0.98 ** (round_number - 1), 0.001)


@pytest.mark.parametrize("round_number", [1, 2, 3, 40, 229, 230, 231, 1000])
def test_lr_schedule_matches_the_reference(round_number):
    assert settings().lr_for(round_number) == pytest.approx(reference_lr(round_number), rel=1e-12, abs=0)


def test_lr_schedule_anchor_values():
    run = settings()
    assert run.lr_for(1) == pytest.approx(0.1, rel=1e-12)
    assert run.lr_for(2) == pytest.approx(0.098, rel=1e-12)
    assert run.lr_for(40) == pytest.approx(0.1 * 0.98**39, rel=1e-12)
    assert run.lr_for(10_000) == pytest.approx(0.001, rel=1e-12)


def test_lr_schedule_scales_with_the_starting_lr():
    run = settings(train=TrainConfig(lr=0.5), lr_decay=0.5, lr_min_factor=0.1)
    assert [run.lr_for(r) for r in (1, 2, 3, 4, 5)] == pytest.approx([0.5, 0.25, 0.125, 0.0625, 0.05])


def test_evaluation_rounds_for_the_reference_run():
    run = settings(rounds=40, eval_every=10)
    assert {r for r in range(1, 41) if run.evaluates(r)} == {1, 11, 21, 31, 40}


def test_evaluation_every_round():
    run = settings(rounds=3, eval_every=1)
    assert [run.evaluates(r) for r in (1, 2, 3)] == [True, True, True]


def test_defaults_are_valid():
    run = settings()
    assert run.validated() is run


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"workers": {}}, "workers"),
        ({"rounds": 0}, "rounds"),
        ({"eval_every": 0}, "eval_every"),
        ({"weighting": "median"}, "weighting"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"lr_decay": 1.5}, "lr_decay"),
        ({"lr_decay": math.nan}, "lr_decay"),
        ({"lr_min_factor": -0.1}, "lr_min_factor"),
        ({"round_timeout": 0.0}, "round_timeout"),
        ({"eval_timeout": float("nan")}, "eval_timeout"),
        ({"min_workers": 0}, "min_workers"),
        ({"round_retries": -1}, "round_retries"),
        ({"connect_timeout": math.inf}, "connect_timeout"),
        ({"model": ""}, "model"),
        ({"task": " "}, "task"),
        ({"task": "mnist\n"}, "task"),
        ({"init_weights": Path("/nonexistent/init.safetensors")}, "init_weights"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"train": TrainConfig(lr=0.0)}, "lr"),
    ],
)
def test_validated_names_the_bad_field(changes, field):
    with pytest.raises(InvalidConfig) as caught:
        settings(**changes).validated()
    assert str(caught.value).startswith(f"{field}: ")


def test_task_and_model_names_are_the_fleets_business():
    """The coordinator imports no task or model code: any name is valid here, and the
    fleet's GetInfo decides at connect time (tests/integration/test_fleet_checks.py)."""
    run = settings(task="tiny-digits", model="efficientnet_b0")
    assert run.validated() is run
    assert (settings().task, settings().model, settings().init_weights) == ("mnist", None, None)
