"""metrics.jsonl made to agree with the checkpoint: rounds 1..N once each, whatever a
crash, a full disk or an earlier version left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.federation import RunFailed
from coordinator.resume import _agree, _whole_lines


def line(number: int, **extra: object) -> str:
    return json.dumps({"round": number, **extra}, sort_keys=True)


def test_a_torn_tail_is_dropped(tmp_path: Path) -> None:
    text = line(1) + "\n" + line(2) + "\n" + '{"round": 3, "fa'
    assert _whole_lines(tmp_path, text) == [(1, line(1)), (2, line(2))]


def test_unreadable_whole_lines_at_the_end_are_a_torn_tail_too(tmp_path: Path) -> None:
    """A file system may keep a crashed append's length but not its bytes: zeros."""
    assert _whole_lines(tmp_path, line(1) + "\n" + "\0" * 40 + "\n") == [(1, line(1))]


def test_a_damaged_line_before_good_ones_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match="line 2 is not a round's record"):
        _whole_lines(tmp_path / "metrics.jsonl", line(1) + "\nnot json\n" + line(3) + "\n")


def test_rounds_after_the_checkpoint_go_and_its_own_round_comes_back() -> None:
    lines = [(1, line(1)), (3, line(3))]
    assert _agree(lines, 2, {"round": 2, "lr": 0.1}) == [(1, line(1)), (2, line(2, lr=0.1))]


def test_a_round_recorded_twice_appears_once_with_its_last_record() -> None:
    lines = [(1, line(1, run="first")), (1, line(1, run="again")), (2, line(2))]
    assert _agree(lines, 2, None) == [(1, line(1, run="again")), (2, line(2))]


def test_a_checkpoint_from_before_a_parameter_existed_pins_its_old_behaviour() -> None:
    from coordinator.resume import _fill_added_params, _strategy_identity
    from coordinator.strategies.registry import StrategySpec

    written = {"name": "fedavgm", "params": {"aggregator": "mean", "server_optimizer": "momentum", "mu": 0.0,
                                            "sample": 0, "server_lr": 1.3, "momentum": 0.6}}
    _fill_added_params(written)  # Nesterov came later: off, as that code stepped
    assert written == _strategy_identity(StrategySpec("fedavgm"))
    assert written != _strategy_identity(StrategySpec("fedavgm", {"nesterov": 1}))
    scaffold = {"name": "scaffold", "params": {"sample": 0, "server_lr": 1.0}}
    _fill_added_params(scaffold)  # its server optimizer came later: plain
    assert scaffold == _strategy_identity(StrategySpec("scaffold"))


def test_max_concurrency_is_part_of_a_runs_identity() -> None:
    from coordinator.resume import run_identity
    from coordinator.settings import RunSettings

    def identity(**extra: object) -> dict:
        return run_identity(RunSettings(workers={"a": "h:1"}, evaluator=None, out_dir=Path("."), **extra), "m")

    # a round that streams its updates sums them otherwise: its last bits differ
    assert identity(max_concurrency=4) != identity()
    assert identity()["max_concurrency"] == 0  # what a checkpoint from before the flag is filled with
