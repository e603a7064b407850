"""The worker's round slot and run ledger, the work bound and the training loop's stop
flag, without a server (the real-process tests are tests/integration/test_worker_wedge.py)."""

from __future__ import annotations

import threading
from typing import List

import pytest
import torch

from coordinator.federation import describe_failure, refused_by_another_run
from jetfed.config import TrainConfig, work_limit
from jetfed.errors import InvalidConfig, ManifestMismatch, RunConflict, TrainingStopped, WorkerBusy
from jetfed.models import build_model
from jetfed.tasks.base import TensorExamples
from jetfed.training import train_round
from worker.rounds import MAX_RUN_HOLD_S, RunLedger, TrainingSlot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ledger_after(rounds: List[float], clock: Clock, run_id: str = "run-a") -> RunLedger:
    """A ledger that saw `run_id`'s Trains start at `rounds` offsets, each lasting 1 s."""
    ledger = RunLedger("alice", clock)
    start = clock.now
    for offset in rounds:
        clock.now = start + offset
        ledger.started(run_id, "ipv4:10.0.0.1:5000")
        clock.now += 1.0
        ledger.ended(run_id)
    return ledger


def test_the_reference_recipe_is_320_examples():
    assert TrainConfig().examples_per_round(24_000) == 320
    TrainConfig().require_work_within(24_000, 320)


@pytest.mark.parametrize("config, size, examples", [
    (TrainConfig(batch_size=1, max_batches=0, epochs=3), 240, 720),
    (TrainConfig(batch_size=64, max_batches=100, epochs=2), 240, 480),
    (TrainConfig(batch_size=10, max_batches=5, epochs=4), 240, 200),
])
def test_examples_per_round_caps_each_epoch_at_the_data_set(config, size, examples):
    assert config.examples_per_round(size) == examples


def test_work_over_the_limit_names_the_fields_and_the_setting():
    config = TrainConfig(batch_size=1, max_batches=0, epochs=1000)
    with pytest.raises(InvalidConfig) as refused:
        config.require_work_within(24_000, 1_000_000)
    message = str(refused.value)
    assert "epochs 1000" in message and "max_batches 0 (the whole data set)" in message
    assert "24000000 examples" in message and "--max-examples-per-round of 1000000" in message


def test_the_work_limit_setting_must_be_positive():
    assert work_limit(1) == 1
    with pytest.raises(InvalidConfig, match="--max-examples-per-round: 0"):
        work_limit(0)


def test_a_held_slot_refuses_and_says_why():
    slot = TrainingSlot("alice")
    held = slot.claim(7, "run-a")
    with pytest.raises(WorkerBusy, match="already training round 7"):
        slot.claim(8, "run-a")
    held.abandon()
    with pytest.raises(WorkerBusy, match="stopping round 7, abandoned"):
        slot.claim(8, "run-a")
    slot.release(held)
    assert not slot.locked()
    slot.claim(8, "run-a")


def test_abandon_sets_the_stop_flag_once():
    held = TrainingSlot("alice").claim(1, "")
    assert held.abandon() and held.stop.is_set() and held.abandoned_at is not None
    assert not held.abandon()


def test_another_run_is_refused_while_the_first_is_in_progress():
    clock = Clock()
    ledger = RunLedger("alice", clock)
    ledger.started("run-a", "ipv4:10.0.0.1:5000")
    with pytest.raises(RunConflict) as refused:
        ledger.check("run-b")
    assert "run-a" in str(refused.value) and "run-b" in str(refused.value)
    assert "in progress" in str(refused.value)
    ledger.check("run-a")


def test_another_run_waits_twice_the_first_runs_pace():
    clock = Clock()
    ledger = ledger_after([0.0, 5.0, 10.0], clock)  # a Train every 5 s, the last ended at 11
    clock.now = 100.0 + 11.0 + 9.9
    with pytest.raises(RunConflict, match="due again within 10.0s"):
        ledger.check("run-b")
    clock.now = 100.0 + 11.0 + 10.0
    ledger.check("run-b")


def test_a_slow_evaluation_round_keeps_the_hold_after_fast_rounds():
    clock = Clock()
    # Fast rounds every 2 s, one 8 s gap (an evaluation round), then fast again: the
    # hold follows the slowest gap, so the next evaluation round does not lapse it.
    ledger = ledger_after([0.0, 2.0, 10.0, 12.0, 14.0], clock)
    clock.now = 100.0 + 15.0 + 15.9
    with pytest.raises(RunConflict, match="due again within 16.0s"):
        ledger.check("run-b")
    clock.now = 100.0 + 15.0 + 16.0
    ledger.check("run-b")


def test_with_one_train_the_hold_is_twice_its_duration():
    clock = Clock()
    ledger = ledger_after([0.0], clock)
    clock.now += 1.9
    with pytest.raises(RunConflict):
        ledger.check("run-b")
    clock.now += 0.1
    ledger.check("run-b")


def test_the_hold_is_capped():
    clock = Clock()
    ledger = ledger_after([0.0, 3600.0], clock)
    clock.now += MAX_RUN_HOLD_S
    ledger.check("run-b")


def test_a_train_without_run_id_is_never_refused_nor_recorded():
    clock = Clock()
    ledger = ledger_after([0.0], clock)
    ledger.check("")
    ledger.started("", "ipv4:10.0.0.2:5000")
    with pytest.raises(RunConflict):
        ledger.check("run-b")
    fresh = RunLedger("alice", clock)
    fresh.started("", "ipv4:10.0.0.2:5000")
    fresh.check("run-b")


def test_a_long_run_id_is_refused():
    with pytest.raises(InvalidConfig, match="run_id: 129 characters"):
        RunLedger("alice").check("x" * 129)


def test_an_ended_run_frees_the_worker_at_once():
    clock = Clock()
    ledger = ledger_after([0.0, 5.0], clock)
    with pytest.raises(RunConflict):
        ledger.check("run-b")
    assert ledger.release("run-a")
    ledger.check("run-b")
    ledger.started("run-b", "ipv4:10.0.0.2:5000")
    with pytest.raises(RunConflict, match="run-b"):
        ledger.check("run-a")


def test_only_the_served_run_can_be_ended():
    clock = Clock()
    ledger = ledger_after([0.0], clock)
    assert not ledger.release("run-b")
    assert not ledger.release("")
    assert not RunLedger("alice", clock).release("run-a")
    with pytest.raises(RunConflict):
        ledger.check("run-b")


def test_a_run_ended_during_its_train_is_freed_when_that_train_ends():
    """Its coordinator cancelled the call and said EndRun before the worker saw the cancel."""
    clock = Clock()
    ledger = ledger_after([0.0, 5.0], clock)
    ledger.started("run-a", "ipv4:10.0.0.1:5000")
    assert not ledger.release("run-a")
    with pytest.raises(RunConflict, match="in progress"):
        ledger.check("run-b")
    ledger.ended("run-a")
    ledger.check("run-b")


def test_a_freed_run_that_trains_again_holds_the_worker_again():
    clock = Clock()
    ledger = ledger_after([0.0], clock)
    ledger.started("run-a", "ipv4:10.0.0.1:5000")
    ledger.release("run-a")
    ledger.ended("run-a")
    ledger.started("run-a", "ipv4:10.0.0.1:5000")
    clock.now += 1.0
    ledger.ended("run-a")
    with pytest.raises(RunConflict):
        ledger.check("run-b")


def test_ending_a_run_refuses_a_long_id():
    with pytest.raises(InvalidConfig, match="run_id: 129 characters"):
        RunLedger("alice").release("x" * 129)


def test_the_coordinator_tells_a_run_conflict_from_other_preconditions():
    ledger = ledger_after([0.0], Clock())
    with pytest.raises(RunConflict) as refused:
        ledger.check("run-b")
    assert str(refused.value).startswith(RunConflict.MARKER)
    assert refused_by_another_run(describe_failure(refused.value))
    assert not refused_by_another_run(describe_failure(ManifestMismatch("weights of another model")))
    assert not refused_by_another_run(f"ABORTED: {RunConflict.MARKER}")


def test_training_stops_at_the_next_batch_once_told():
    torch.manual_seed(0)
    data = TensorExamples(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)), torch.device("cpu"))
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingStopped, match="after 0 examples"):
        train_round(build_model("mnist-cnn"), data, TrainConfig(batch_size=8, max_batches=0, epochs=5), 0, stop)
    outcome = train_round(build_model("mnist-cnn"), data, TrainConfig(batch_size=8, max_batches=2), 0,
                          threading.Event())
    assert outcome.num_examples == 16
