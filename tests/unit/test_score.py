"""Score: the evaluator's answer as the round loop sees it, with the task's named
metrics, or loss and accuracy derived for an evaluator that sends none."""

from __future__ import annotations

import pytest

from coordinator.board import RunBoard
from coordinator.clients import Score, _score
from coordinator.progress import render
from coordinator.status_service import status_message
from jetfed.v1 import evaluation_pb2


def test_a_score_carries_the_metrics_the_evaluator_named():
    response = evaluation_pb2.EvaluateResponse(
        correct=150, total=200, loss=0.8, predicted_counts=[120, 80],
        metrics={"loss": 0.8, "accuracy": 0.75, "recall/cat": 0.9, "recall/dog": 0.6},
    )
    score = _score(response)
    assert (score.correct, score.total, score.loss, score.predicted_counts) == (150, 200, pytest.approx(0.8), (120, 80))
    assert score.metrics == {"loss": pytest.approx(0.8), "accuracy": 0.75, "recall/cat": 0.9, "recall/dog": 0.6}
    assert score.accuracy == 0.75 and score.classifies


def test_an_evaluator_older_than_tasks_gets_loss_and_accuracy_derived():
    score = _score(evaluation_pb2.EvaluateResponse(correct=3, total=4, loss=0.5, predicted_counts=[1, 3]))
    assert score.metrics == {"loss": 0.5, "accuracy": 0.75}


def test_a_task_that_does_not_classify_keeps_its_own_metrics_and_no_counts():
    score = _score(evaluation_pb2.EvaluateResponse(loss=0.25, metrics={"loss": 0.25, "mae": 3.5}))
    assert score.metrics == {"loss": 0.25, "mae": 3.5}
    assert (score.total, score.accuracy, score.classifies) == (0, 0.0, False)


def test_a_task_may_report_accuracy_without_counts():
    score = Score(0, 0, 0.1, (), {"loss": 0.1, "accuracy": 0.5})
    assert score.accuracy == 0.5


def test_the_status_message_carries_each_models_metrics():
    board = RunBoard.for_workers(3, "/tmp/run", {"alice": "127.0.0.1:1"})
    board.evaluated(2, {
        "alice": Score(1, 4, 1.5, (4, 0), {"loss": 1.5, "accuracy": 0.25, "recall/0": 1.0, "recall/1": 0.0}),
        "global": Score(0, 0, 0.2, (), {"loss": 0.2, "mae": 3.25}),
    })
    status = status_message(board)
    assert status.last_evaluated_round == 2
    by_model = {s.model: s for s in status.last_evaluation}
    assert dict(by_model["alice"].metrics) == {"loss": 1.5, "accuracy": 0.25, "recall/0": 1.0, "recall/1": 0.0}
    assert (by_model["alice"].correct, by_model["alice"].total, by_model["alice"].accuracy) == (1, 4, 0.25)
    assert dict(by_model["global"].metrics) == {"loss": 0.2, "mae": 3.25}
    assert by_model["global"].total == 0


def test_progress_shows_accuracy_or_the_tasks_metrics():
    board = RunBoard.for_workers(3, "/tmp/run", {"alice": "127.0.0.1:1"})
    board.evaluated(1, {"global": Score(97, 100, 0.1, (100,), {"loss": 0.1, "accuracy": 0.97, "recall/0": 0.97})})
    assert render(board).caption == "round 1: federated model 97.00%"
    board.evaluated(2, {"global": Score(0, 0, 0.2, (), {"loss": 0.2, "mae": 3.25})})
    assert render(board).caption == "round 2: federated model loss 0.2, mae 3.25"
